"""The ``auto`` connector: a target receives every way it can, a source sends the best way per pair.

Where a launcher places workers decides how their KV moves, not a flag. A decode worker running ``auto``
listens with a same-node connector (``shm`` for a cache in host memory, which it places in shared memory;
``cuda_ipc`` for a cache on a CUDA device: the device backend's ``same_node_connector``) and with ``tcp``, and advertises both in its target
(``KVTarget.alternatives``, same-node first). A prefill worker sends with the first alternative it can reach
(``KVConnector.can_reach``: same node, and for CUDA IPC a CUDA cache of its own), else TCP. Everything a
request's stream sends (layers, the last notice, a refusal) goes the one way chosen for its target.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from pdserve.devices import backend_for_device
from pdserve.kv.base import ConnectorCapabilities, LoadDone, SaveDone
from pdserve.kv.blocks import dtype_name
from pdserve.kv.connector import ConnectorConfig, KVConnector, LayerJob, SaveJob, node_name
from pdserve.kv.registry import connector_class, make_connector
from pdserve.protocol import KVReservationMsg, KVTarget

logger = logging.getLogger(__name__)

NETWORK = "tcp"


class AutoConnector(KVConnector):
    capabilities = ConnectorCapabilities(is_target=True, places_cache=True, writes_remotely=True, layerwise=True)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self._receivers: list[KVConnector] = []  # target side, same-node first, then the network
        self._senders: dict[str, KVConnector] = {}  # source side, by connector name
        self._is_listening = False

    # -- the cache ----------------------------------------------------------------------------------------
    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shm = self._receiver("shm")
        return shm.allocate_cache(shape, dtype)

    def register_cache(self, cache: torch.Tensor) -> None:
        super().register_cache(cache)
        for conn in self._senders.values():
            conn.register_cache(cache)
        if not self._is_listening:
            return
        local = backend_for_device(cache.device).same_node_connector  # shm, cuda_ipc, a plugin's or None
        if local == "shm" and not (self._has("shm") and getattr(self._get("shm"), "path", None) is not None):
            local = None  # a host cache this connector did not place in shared memory
        for conn in list(self._receivers):
            if conn.name not in (local, NETWORK):
                conn.close()
                self._receivers.remove(conn)
        if local is not None and not self._has(local):
            self._receiver(local).listen()
        self._receivers.sort(key=lambda c: c.name == NETWORK)  # same-node first
        for conn in self._receivers:
            conn.register_cache(cache)

    # -- target side ----------------------------------------------------------------------------------------
    def listen(self) -> None:
        self._is_listening = True
        self._receiver(NETWORK, self.config.port).listen()
        self._receiver("shm").listen()  # kept if the cache turns out to be in host memory

    def target(self) -> KVTarget:
        assert self.cache is not None, "register_cache() first"
        alternatives = [c.target() for c in self._receivers]
        network = self._get(NETWORK)
        return KVTarget(self.config.worker_id, self.name, network.address, node_name(), list(self.cache.shape),
                        dtype_name(self.cache.dtype), alternatives=alternatives)

    def expect(self, reservation: KVReservationMsg) -> None:
        for conn in self._receivers:
            conn.expect(reservation)

    def cancel(self, request_id: str) -> None:
        for conn in self._receivers:
            conn.cancel(request_id)

    def poll_loads(self) -> list[LoadDone]:
        out = []
        for conn in self._receivers:
            for load in conn.poll_loads():
                for other in self._receivers:
                    if other is not conn:
                        other.cancel(load.request_id)  # it came this way: nothing comes the others
                out.append(load)
        return out

    # -- source side ----------------------------------------------------------------------------------------
    def start_save(self, job: SaveJob, cache: torch.Tensor) -> None:
        conn, target = self._route(job.reservation.target, cache)
        conn.start_save(replace(job, reservation=_retarget(job.reservation, target)), cache)

    def save_layer(self, job: LayerJob, cache: torch.Tensor) -> None:
        conn, target = self._route(job.reservation.target, cache)
        conn.save_layer(replace(job, reservation=_retarget(job.reservation, target)), cache)

    def poll_saves(self) -> list[SaveDone]:
        return [done for conn in self._senders.values() for done in conn.poll_saves()]

    def refuse(self, reservation: KVReservationMsg, reason: str) -> None:
        conn, target = self._route(reservation.target, self.cache)
        conn.refuse(_retarget(reservation, target), reason)

    def wait_handles(self) -> list:
        return [h for conn in [*self._receivers, *self._senders.values()] for h in conn.wait_handles()]

    def close(self) -> None:
        for conn in [*self._receivers, *self._senders.values()]:
            conn.close()
        self._receivers.clear()
        self._senders.clear()

    def route_name(self, target: KVTarget, cache: torch.Tensor | None) -> str:
        """The connector a save to ``target`` goes with (for logs and tests)."""
        return self._pick(target, cache).connector

    # -- private ------------------------------------------------------------------------------------------
    def _pick(self, target: KVTarget, cache: torch.Tensor | None) -> KVTarget:
        choices = target.alternatives or [target]
        for alt in choices:
            if alt.connector == self.name:
                continue
            try:
                cls = connector_class(alt.connector)
            except ValueError:
                continue
            if cache is None or cls.can_reach(alt, cache):
                return alt
        raise ValueError(f"no way to reach {target.worker_id}'s cache from node {node_name()} "
                         f"(it receives with {[a.connector for a in choices]})")

    def _route(self, target: KVTarget, cache: torch.Tensor | None) -> tuple[KVConnector, KVTarget]:
        alt = self._pick(target, cache if cache is not None else self.cache)
        conn = self._senders.get(alt.connector)
        if conn is None:
            conn = make_connector(alt.connector, ConnectorConfig(self.config.worker_id, self.config.host))
            if self.cache is not None:
                conn.register_cache(self.cache)
            self._senders[alt.connector] = conn
            logger.info("KV to %s goes by %s", target.worker_id, alt.connector)
        return conn, alt

    def _receiver(self, name: str, port: int = 0) -> KVConnector:
        if not self._has(name):
            self._receivers.append(make_connector(name, ConnectorConfig(self.config.worker_id, self.config.host, port)))
        return self._get(name)

    def _has(self, name: str) -> bool:
        return any(c.name == name for c in self._receivers)

    def _get(self, name: str) -> KVConnector:
        return next(c for c in self._receivers if c.name == name)


def _retarget(reservation: KVReservationMsg, target: KVTarget) -> KVReservationMsg:
    """The reservation as the chosen way's connector sees it (its own target)."""
    import msgspec

    return msgspec.structs.replace(reservation, target=target)
