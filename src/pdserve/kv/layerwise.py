"""Layer-wise saves: which layers of which held prompts are in the cache, and the streams that send them on.

A prefill worker computes a prompt in chunks (one or more steps), and within a step layer by layer. The
engine tells this object which requests' chunks a step computes (``begin_step``) and when each layer's
forward pass is done (``layer_done``, from inside the forward pass). Once a request's reservation is known
(the decode worker answers while the prompt is computing), ``open`` starts its stream on a layer-wise
connector: the layers computed so far go at once, then each further layer of each chunk as soon as it is
written (``KVConnector.save_layer``, off the engine's thread), so the transfer hides behind the compute of
the layers and chunks after it. ``finish`` says whether the stream carried everything, in which case the
request's save only sends its notice (the first token); otherwise (no stream, or a stream broken by a
preemption that recomputes the prompt into other blocks) the save sends the whole request, which overwrites
whatever the stream had written.

A block that the next chunk fills further is sent again with it (the last copy wins: one connection, in
order). Blocks the target already holds (its prefix hits, ``num_cached_tokens``) are never sent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.kv.connector import KVConnector, LayerJob
from pdserve.kv.staging import Staging
from pdserve.protocol import KVReservationMsg

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    connector: KVConnector
    reservation: KVReservationMsg
    skip: int  # blocks the target holds already
    num_sent: list[int]  # per layer: tokens sent
    is_broken: bool = False


@dataclass
class _Progress:
    block_ids: list[int] = field(default_factory=list)
    num_done: list[int] | None = None  # per layer: tokens whose KV is in the cache (None: not seen yet)
    stream: _Stream | None = None


class LayerwiseSaves:
    """One per worker; every method runs on the worker's thread (``layer_done`` inside the forward pass)."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache
        self.num_layers = cache.shape[0]
        self.block_size = cache.shape[3]
        self._staging = Staging.for_cache(cache)
        self._requests: dict[str, _Progress] = {}
        self._step: list[tuple[str, int]] = []  # this step's tracked requests and the end of their chunk
        self.num_layer_jobs = 0
        # Called at each layer's end, before its saves: the worker takes reservations that arrived during the
        # step here (``open`` may run inside a step), or a prompt computed in one step would find every layer
        # done when its reservation is read, and nothing of its transfer would overlap the compute.
        self.between_layers: Callable[[], None] | None = None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def track(self, request_id: str) -> None:
        """A request whose prompt this worker computes for a decode worker (held for a save)."""
        self._requests.setdefault(request_id, _Progress())

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    # -- the engine ------------------------------------------------------------------------------------
    def begin_step(self, chunks: list[tuple[str, int, int, list[int]]]) -> bool:
        """The step about to run computes ``(request_id, start, num_tokens, block_ids)`` chunks; True when any
        is tracked (then ``layer_done`` is worth calling)."""
        self._step = []
        for rid, start, num_tokens, block_ids in chunks:
            p = self._requests.get(rid)
            if p is None:
                continue
            if p.num_done is not None and (start < max(p.num_done) or block_ids[:len(p.block_ids)] != p.block_ids):
                # Recomputed (a preemption freed its blocks): what was sent may be stale; the save sends it whole.
                if p.stream is not None and not p.stream.is_broken:
                    logger.info("request %s: recomputed; its KV goes whole, not layer by layer", rid)
                    p.stream.is_broken = True
                p.num_done = None
            p.block_ids = list(block_ids)
            if p.num_done is None:
                p.num_done = [start] * self.num_layers  # its local prefix hits are in the cache already
                self._catch_up(p)
            self._step.append((rid, start + num_tokens))
        return bool(self._step)

    def layer_done(self, layer: int) -> None:
        """Layer ``layer`` of every chunk of this step is written (its kernels queued, on an accelerator)."""
        if self.between_layers is not None:
            self.between_layers()
        ready = None
        for rid, end in self._step:
            p = self._requests.get(rid)
            if p is None:
                continue
            p.num_done[layer] = end
            s = p.stream
            if s is None or s.is_broken:
                continue
            if ready is None:
                ready = self._staging.mark()
            self._send(p, s, layer, layer + 1, ready)

    # -- the worker ------------------------------------------------------------------------------------
    def open(self, request_id: str, connector: KVConnector, reservation: KVReservationMsg) -> None:
        """Stream the request's KV to ``reservation`` with ``connector`` (capability ``layerwise``): what is
        computed now goes at once, the rest layer by layer as it is computed. Between steps, or inside one
        (``between_layers``)."""
        p = self._requests.get(request_id)
        if p is None or p.stream is not None:
            return
        skip = reservation.num_cached_tokens // self.block_size
        p.stream = _Stream(connector, reservation, skip, [skip * self.block_size] * self.num_layers)
        if p.num_done is not None:
            self._catch_up(p, self._staging.mark())  # may be inside a step: the sends wait for its kernels

    def finish(self, request_id: str, src_block_ids: list[int]) -> bool:
        """The prompt is computed and its save starts: True when the stream sent every layer of every block
        (the save then carries only the notice), False when the save must send the whole request."""
        p = self._requests.get(request_id)
        if p is None or p.stream is None or p.stream.is_broken or p.num_done is None:
            return False
        s = p.stream
        n = len(src_block_ids)
        return src_block_ids == p.block_ids[:n] and len(s.reservation.block_ids) == n and \
            all(-(-sent // self.block_size) >= n for sent in s.num_sent)

    # -- private ---------------------------------------------------------------------------------------
    def _catch_up(self, p: _Progress, ready=None) -> None:
        """Send every layer's computed blocks that the stream has not sent yet (layers with the same extent
        in one job)."""
        s = p.stream
        if s is None or s.is_broken:
            return
        layer = 0
        while layer < self.num_layers:
            end = layer + 1
            while end < self.num_layers and p.num_done[end] == p.num_done[layer] and \
                    s.num_sent[end] == s.num_sent[layer]:
                end += 1
            self._send(p, s, layer, end, ready)
            layer = end

    def _send(self, p: _Progress, s: _Stream, layer_start: int, layer_end: int, ready) -> None:
        """Blocks from the one holding the first unsent token to the one holding the last computed token."""
        done = p.num_done[layer_start]
        first = max(s.skip, s.num_sent[layer_start] // self.block_size)
        last = min(-(-done // self.block_size), len(s.reservation.block_ids), len(p.block_ids))
        if last <= first:
            return
        job = LayerJob(s.reservation.request_id, s.reservation, layer_start, layer_end,
                       p.block_ids[first:last], s.reservation.block_ids[first:last], ready)
        s.connector.save_layer(job, self.cache)
        self.num_layer_jobs += 1
        for layer in range(layer_start, layer_end):
            s.num_sent[layer] = done
