"""The base of the built-in connectors: notices (and any block data) over ZMQ PUSH -> PULL.

A target binds a PULL socket (its ``KVTarget.address``). A source's save runs on a background thread
(``ThreadedSaves``): it checks the deadline and the block counts, moves the data (``_write``: shm copies
into the target's mapped cache and sends no frames; tcp returns the blocks as frames to send), then sends a
``KVTransferDone`` notice followed by the frames. The target validates each notice against the request's
reservation before it writes anything (``_read``) and reports a ``LoadDone``.

Layer-wise (``save_layer``): each layer job moves its layers the same way, behind a ``KVLayerData`` notice,
on the same thread and socket (so in order); the target writes them into the reserved blocks as they come
and keeps which (layer, block) pairs landed. The request's last notice (``streamed``) carries the first
token; the target reports the load only if every layer of every reserved block landed and no layer failed.
"""
from __future__ import annotations

import abc
import logging
import time

import torch
import zmq

from pdserve.kv.base import LoadDone, SaveDone
from pdserve.kv.blocks import ALL_LAYERS, block_bytes, blocks_checksum, dtype_name
from pdserve.kv.connector import ConnectorConfig, KVConnector, LayerJob, SaveJob, ThreadedSaves, node_name
from pdserve.kv.faults import KVFaults
from pdserve.kv.staging import Staging
from pdserve import security
from pdserve.protocol import (KVLayerData, KVReservationMsg, KVTarget, KVTransferDone, decode_kv_plane,
                              encode)

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0
MAX_PUSH_SOCKETS = 64  # source side: sockets to targets kept open (each a pipe and a connection)


class ZmqConnector(KVConnector):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self.context = zmq.Context.instance()
        self.socket: zmq.Socket | None = None  # target side: notices in
        self.address = ""
        self._expected: dict[str, KVReservationMsg] = {}
        self._saves: ThreadedSaves | None = None
        self._push: dict[str, zmq.Socket] = {}  # source side, used on the save thread only
        self.faults = KVFaults.from_env()  # test-only fault injection; off unless PDSERVE_FAULTS is set
        self._staging: dict[str, Staging] = {}  # by device
        # Layer-wise streams. Source side (save thread only): bytes sent, and the first error, per request.
        self._streamed_bytes: dict[str, int] = {}
        self._stream_errors: dict[str, str] = {}
        # Target side: per expected request, which (layer, block) pairs landed, and a layer's failure.
        self._landed: dict[str, bytearray] = {}
        self._landed_errors: dict[str, str] = {}

    def staging(self, cache: torch.Tensor) -> Staging:
        """How blocks of ``cache`` (on any device) reach host memory and back."""
        key = str(cache.device)
        staging = self._staging.get(key)
        if staging is None:
            staging = self._staging[key] = Staging.for_cache(cache)
        return staging

    # -- target side ----------------------------------------------------------------------------------------
    def listen(self) -> None:
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.address = security.bind(self.socket, self.config.host, self.config.port)

    def target(self) -> KVTarget:
        assert self.cache is not None and self.socket is not None, "listen() and register_cache() first"
        return KVTarget(self.config.worker_id, self.name, self.address, node_name(),
                        list(self.cache.shape), dtype_name(self.cache.dtype), self._target_params())

    def expect(self, reservation: KVReservationMsg) -> None:
        self._expected[reservation.request_id] = reservation

    def cancel(self, request_id: str) -> None:
        self._expected.pop(request_id, None)
        self._landed.pop(request_id, None)
        self._landed_errors.pop(request_id, None)

    def poll_loads(self) -> list[LoadDone]:
        done = []
        while self.socket is not None:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                notice = decode_kv_plane(parts[0].buffer)
            except ValueError as e:
                logger.warning("dropping a malformed KV notice: %s", e)
                continue
            load = self._on_notice(notice, parts[1:])
            if load is not None:
                done.append(load)
        return done

    # -- source side ----------------------------------------------------------------------------------------
    def start_save(self, job: SaveJob, cache: torch.Tensor) -> None:
        self._save_thread().submit(job, cache)

    def save_layer(self, job: LayerJob, cache: torch.Tensor) -> None:
        self._save_thread().run(lambda: self._send_layer(job, cache))

    def poll_saves(self) -> list[SaveDone]:
        return self._saves.poll() if self._saves is not None else []

    def refuse(self, reservation: KVReservationMsg, reason: str) -> None:
        notice = KVTransferDone(reservation.request_id, False, error=reason)
        self._save_thread().run(lambda: self._notify_quietly(reservation.target.address, notice))

    def wait_handles(self) -> list:
        handles: list = [self.socket] if self.socket is not None else []
        if self._saves is not None:
            handles.append(self._saves.wake_fd)
        return handles

    def close(self) -> None:
        if self._saves is not None:
            self._saves.close()  # queued notices go out first
            self._saves = None
        for sock in self._push.values():
            sock.close()  # with the socket's linger: queued notices still go out
        self._push.clear()
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def _corrupt(self, frames: list, dst: list[int], target: KVTarget) -> None:
        """Fault injection: flip a byte of what was sent (the frames, or the target's block written)."""
        logger.warning("fault injection: a byte of the KV sent to %s is flipped", target.worker_id)
        if frames:
            frames[0][0] ^= 0xFF  # a numpy view of the gathered blocks
        elif dst:
            self._corrupt_target_block(target, dst[0])

    def _corrupt_target_block(self, target: KVTarget, block_id: int) -> None:
        raise NotImplementedError

    # -- what subclasses provide -------------------------------------------------------------------------------
    def _target_params(self) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def _write(self, cache: torch.Tensor, src: list[int], dst: list[int], target: KVTarget,
               layers: slice = ALL_LAYERS, ready=None) -> list:
        """Source side, on the save thread: move ``layers`` of blocks ``src`` of ``cache`` toward ``dst`` of
        the target (``ready``: the compute stream's event to wait for); return frames to send behind the
        notice ([] when the data is already in place). Raise on failure."""

    @abc.abstractmethod
    def _read(self, dst: list[int], frames: list, layers: slice = ALL_LAYERS) -> None:
        """Target side: put a validated arrival's data into ``layers`` of ``self.cache`` at ``dst`` (raise
        ValueError on bad data)."""

    # -- private ------------------------------------------------------------------------------------------
    def _save_thread(self) -> ThreadedSaves:
        if self._saves is None:
            self._saves = ThreadedSaves(f"kv-save-{self.name}", self._send)
        return self._saves

    def _send(self, job: SaveJob, cache: torch.Tensor) -> SaveDone:
        """On the save thread."""
        r = job.reservation
        block_size = cache.shape[3]
        skip = r.num_cached_tokens // block_size
        src, dst = list(job.src_block_ids[skip:]), list(r.block_ids[skip:])
        notice = KVTransferDone(job.request_id, True, dst, job.first_token_id, job.first_logprobs,
                                streamed=job.streamed)
        streamed_bytes = self._streamed_bytes.pop(job.request_id, 0)
        stream_error = self._stream_errors.pop(job.request_id, None)
        try:
            if stream_error is not None:
                raise RuntimeError(f"a layer of the stream failed: {stream_error}")
            self._check(r, len(src), len(dst))
            notice.kv_bytes = streamed_bytes if job.streamed else len(src) * block_bytes(cache)
            if self.faults.kv_delay_s and not job.streamed:
                time.sleep(self.faults.kv_delay_s)
            if self.faults.verify:
                notice.checksum = blocks_checksum(cache, src)
            frames = [] if job.streamed else self._write(cache, src, dst, r.target)
            if self.faults.corrupts():
                self._corrupt(frames, dst, r.target)
            if self.faults.drops():
                logger.warning("fault injection: the notice of %s is dropped", job.request_id)
                return SaveDone(job.request_id, True, notice.kv_bytes, num_blocks=len(dst),
                                target_worker_id=r.target.worker_id)
            self._notify(r.target.address, notice, frames)
            return SaveDone(job.request_id, True, notice.kv_bytes, num_blocks=len(dst),
                            target_worker_id=r.target.worker_id)
        except (ValueError, OSError, RuntimeError, TimeoutError, zmq.ZMQError) as e:
            logger.warning("KV transfer of %s to %s failed: %s", job.request_id, r.target.worker_id, e)
            self._notify_quietly(r.target.address, KVTransferDone(job.request_id, False, dst, error=str(e)))
            return SaveDone(job.request_id, False, num_blocks=len(dst), error=str(e),
                            target_worker_id=r.target.worker_id)

    def _check(self, r: KVReservationMsg, num_src: int, num_dst: int) -> None:
        if num_src != num_dst:
            raise ValueError(f"{num_src} blocks to send but {num_dst} reserved")
        if r.deadline_unix_s and time.time() > r.deadline_unix_s:
            raise TimeoutError("the reservation's deadline passed before the send")
        if self.capabilities.same_host_only and r.target.host and r.target.host != node_name():
            raise ValueError(f"{self.name} moves KV within one node; the target is on {r.target.host}")

    def _send_layer(self, job: LayerJob, cache: torch.Tensor) -> None:
        """On the save thread: one layer job of a stream; its first failure fails the stream's last save."""
        rid, r = job.request_id, job.reservation
        if rid in self._stream_errors:
            return
        layers = slice(job.layer_start, job.layer_end)
        try:
            self._check(r, len(job.src_block_ids), len(job.dst_block_ids))
            if self.faults.cuts(job.layer_end):
                raise ConnectionError(f"fault injection: the stream is cut before layer {self.faults.kv_cut_layer}")
            frames = self._write(cache, job.src_block_ids, job.dst_block_ids, r.target, layers, job.ready)
            notice = KVLayerData(rid, job.layer_start, job.layer_end, job.dst_block_ids, len(frames))
            self._send_parts(r.target.address, notice, frames)
            num_layers = job.layer_end - job.layer_start
            self._streamed_bytes[rid] = self._streamed_bytes.get(rid, 0) + \
                len(job.src_block_ids) * block_bytes(cache) * num_layers // cache.shape[0]
        except (ValueError, OSError, RuntimeError, TimeoutError, zmq.ZMQError) as e:
            logger.warning("KV stream of %s to %s failed at layer %d: %s", rid, r.target.worker_id,
                           job.layer_start, e)
            self._stream_errors[rid] = str(e)

    def _notify(self, address: str, notice: KVTransferDone, frames: list) -> None:
        notice.num_frames = len(frames)
        self._send_parts(address, notice, frames)

    def _send_parts(self, address: str, notice, frames: list) -> None:
        sock = self._push.get(address)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)  # close() still delivers queued notices
            sock.setsockopt(zmq.SNDTIMEO, 5000)
            sock.setsockopt(zmq.SNDHWM, 0)
            security.connect(sock, address)
            self._push[address] = sock
            if len(self._push) > MAX_PUSH_SOCKETS:  # targets come and go (restarts): the longest unused goes
                self._push.pop(next(iter(self._push))).close()  # (its linger still delivers what is queued)
        else:
            self._push[address] = self._push.pop(address)  # most recently used last
        if not frames:
            sock.send(encode(notice))
            return
        tracker = sock.send_multipart([encode(notice), *frames], copy=False, track=True)
        tracker.wait(SEND_TIMEOUT_S)  # the frames are out of our buffers (and timed honestly)

    def _notify_quietly(self, address: str, notice: KVTransferDone) -> None:
        try:
            self._notify(address, notice, [])
        except zmq.ZMQError as e:
            logger.warning("cannot notify %s of %s: %s", address, notice.request_id, e)

    def _on_notice(self, notice: KVTransferDone | KVLayerData, frames: list) -> LoadDone | None:
        rid = notice.request_id
        if isinstance(notice, KVLayerData):
            self._on_layer(notice, frames)
            return None
        reservation = self._expected.pop(rid, None)
        landed = self._landed.pop(rid, None)
        layer_error = self._landed_errors.pop(rid, None)
        if reservation is None:
            logger.debug("late or unknown KV notice for %s dropped", rid)
            return None
        load = LoadDone(rid, notice.ok, notice.first_token_id, notice.first_logprobs, notice.kv_bytes, notice.error)
        if not notice.ok:
            return load
        skip = reservation.num_cached_tokens // self.cache.shape[3]
        if notice.dst_block_ids != reservation.block_ids[skip:]:
            load.ok, load.error = False, "the notice names blocks other than the reserved ones"
            return load
        if notice.streamed:
            if layer_error is not None:
                load.ok, load.error = False, f"bad KV data in the stream: {layer_error}"
                return load
            expected = self.cache.shape[0] * len(notice.dst_block_ids)
            if (landed.count(1) if landed is not None else 0) != expected:
                load.ok, load.error = False, "the stream ended before every layer of every block landed"
                return load
        try:
            if not notice.streamed:
                self._read(notice.dst_block_ids, [f.buffer for f in frames])
            if notice.checksum is not None and blocks_checksum(self.cache, notice.dst_block_ids) != notice.checksum:
                raise ValueError("the blocks' checksum does not match the sender's")
        except (ValueError, RuntimeError) as e:
            load.ok, load.error = False, f"bad KV data: {e}"
        return load

    def _on_layer(self, notice: KVLayerData, frames: list) -> None:
        """A layer job of a stream: validated against the reservation, written, recorded as landed."""
        rid = notice.request_id
        reservation = self._expected.get(rid)
        if reservation is None or rid in self._landed_errors:
            return  # cancelled, unknown, or already failed: never written
        num_layers = self.cache.shape[0]
        skip = reservation.num_cached_tokens // self.cache.shape[3]
        reserved = reservation.block_ids[skip:]
        position = {b: i for i, b in enumerate(reserved)}
        try:
            if not 0 <= notice.layer_start < notice.layer_end <= num_layers:
                raise ValueError(f"layers [{notice.layer_start}, {notice.layer_end}) of {num_layers}")
            if any(b not in position for b in notice.dst_block_ids):
                raise ValueError("a layer names blocks other than the reserved ones")
            self._read(notice.dst_block_ids, [f.buffer for f in frames], slice(notice.layer_start, notice.layer_end))
        except (ValueError, RuntimeError) as e:
            logger.warning("dropping the KV stream of %s: %s", rid, e)
            self._landed_errors[rid] = str(e)
            return
        landed = self._landed.get(rid)
        if landed is None:
            landed = self._landed[rid] = bytearray(num_layers * len(reserved))
        for layer in range(notice.layer_start, notice.layer_end):
            for b in notice.dst_block_ids:
                landed[layer * len(reserved) + position[b]] = 1
