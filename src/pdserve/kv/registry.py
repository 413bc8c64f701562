"""KV connectors by name: the built-in ones, and ``module:Class`` for connectors that live elsewhere.

A worker runs the connector named by ``--kv-connector``; a prefill worker sends with the connector each
reservation's target names (``KVTarget.connector``), created on first use. An out-of-tree connector is any
importable ``KVConnector`` subclass: ``--kv-connector mypkg.kv:MyConnector``, no change to pdserve.
"""
from __future__ import annotations

import importlib

from pdserve.kv.connector import ConnectorConfig, KVConnector

BUILTIN = {"auto": "pdserve.kv.auto:AutoConnector", "shm": "pdserve.kv.shm:ShmConnector",
           "tcp": "pdserve.kv.tcp:TcpConnector", "cuda_ipc": "pdserve.kv.cuda_ipc:CudaIpcConnector",
           "store": "pdserve.kv.store.connector:StoreConnector"}


def connector_class(name: str) -> type[KVConnector]:
    """The class a connector name (``shm``, ``tcp``, or ``module:Class``) stands for. ValueError when the
    name resolves to nothing, or to something that is not a ``KVConnector``."""
    spec = BUILTIN.get(name, name)
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"unknown KV connector {name!r}: use one of {sorted(BUILTIN)} or module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"KV connector {name!r} cannot be loaded: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, KVConnector)):
        raise ValueError(f"KV connector {name!r} is not a pdserve.kv.connector.KVConnector")
    return cls


def make_connector(name: str, config: ConnectorConfig) -> KVConnector:
    """A new connector of that name; its ``name`` is what targets advertise, so sources find the same class."""
    cls = connector_class(name)
    connector = cls(config)
    connector.name = name
    return connector

