"""Routing: pure policies over instance views (no sockets, no torch), shared with the simulator."""
from pdserve.router.instances import InstanceView, InstanceTracker
from pdserve.router.policies import (DecodePolicy, LeastLoaded, PrefixAware, RoundRobin, RoutingPolicy,
                                     make_policy)
from pdserve.router.router import Route, Router

__all__ = ["InstanceView", "InstanceTracker", "RoutingPolicy", "RoundRobin", "LeastLoaded", "PrefixAware",
           "DecodePolicy", "make_policy", "Route", "Router"]
