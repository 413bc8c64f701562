"""The one narrow interface that moves a request's KV blocks from a prefill worker to a decode worker.

A decode worker owns a ``KVReceiver``: it places the worker's whole KV cache (``allocate_cache``),
describes how senders reach it (``target``), and hands incoming transfers to the worker loop
(``poll``). A prefill worker owns a ``KVSender`` per backend: ``send`` writes the blocks of a finished
prefill into the blocks a decode worker reserved, then notifies the receiver. Backends:

- ``shm`` (one host): the decode worker's cache lives in a file in /dev/shm; the sender maps it and
  copies its blocks straight into the reserved blocks (one copy); the notice follows on a ZMQ socket.
- ``tcp`` (hosts apart): the sender gathers its blocks into one contiguous buffer and sends it as a
  zero-copy ZMQ frame after the notice; the receiver copies the frame into the reserved blocks.

An RDMA backend (NIXL, Mooncake's transfer engine) implements the same two classes: register the cache
in ``allocate_cache``, write remotely in ``send``, and deliver the completion notice through ``poll``.

Safety rule shared by every backend: the receiver validates a notice against the request's current
reservation before it completes the request, and a sender never writes after the reservation's
deadline; the decode worker keeps aborted reservations' blocks until that deadline (plus a grace) has
passed or the notice arrived, so a late write can never land in blocks given to another request.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field

import torch
import zmq

from pdserve.worker.protocol import KVReservationMsg, KVTarget, KVTransferDone, decode_kv_plane, encode

logger = logging.getLogger(__name__)

KV_BACKENDS = ("shm", "tcp")

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TransferRecord:
    """Timing of one request's transfer as the sender saw it (copy + notice, or gather + send)."""

    request_id: str
    backend: str
    num_blocks: int
    kv_bytes: int
    seconds: float
    ok: bool = True
    error: str = ""

    @property
    def gbytes_per_s(self) -> float:
        return self.kv_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class IncomingTransfer:
    """A transfer notice at the decode worker, with its data where the backend carries any."""

    notice: KVTransferDone
    frames: list = field(default_factory=list)  # tcp: zmq.Frame objects holding the blocks in order

    def write_into(self, cache: torch.Tensor) -> float:
        """Copy carried block data into ``cache`` at the notice's destination blocks; return seconds.
        Call only after validating the notice against the current reservation."""
        if not self.frames:
            return 0.0
        t0 = time.perf_counter()
        dst = self.notice.dst_block_ids
        # cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        block_shape = (cache.shape[0], cache.shape[1], -1, *cache.shape[3:])
        i = 0
        for frame in self.frames:
            data = tensor_from_buffer(frame.buffer, cache.dtype).view(block_shape)
            n = data.shape[2]
            copy_blocks(cache, dst[i:i + n], data, list(range(n)))
            i += n
        if i != len(dst):
            raise ValueError(f"transfer {self.notice.request_id}: {i} blocks arrived, {len(dst)} announced")
        return time.perf_counter() - t0


class KVReceiver(abc.ABC):
    """Decode side. Not thread-safe: the worker loop calls every method."""

    backend: str

    def __init__(self, context: zmq.Context, worker_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker_id = worker_id
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.address = bind_socket(self.socket, host, port)
        self.cache: torch.Tensor | None = None

    @abc.abstractmethod
    def allocate_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The engine's ``kv_cache_allocator``: return the (zeroed) cache tensor senders will fill."""

    @abc.abstractmethod
    def target(self) -> KVTarget:
        """How a sender reaches this worker's cache (valid after ``allocate_cache``)."""

    def poll(self) -> list[IncomingTransfer]:
        """Every transfer notice waiting on the socket (non-blocking); malformed ones are logged, dropped."""
        incoming = []
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return incoming
            try:
                notice = decode_kv_plane(parts[0].buffer)
            except ValueError as e:
                logger.warning("dropping malformed KV notice: %s", e)
                continue
            incoming.append(IncomingTransfer(notice, list(parts[1:])))

    def close(self) -> None:
        self.socket.close(0)


class KVSender(abc.ABC):
    """Prefill side. ``send`` blocks until the data is out of the sender's hands; it never raises for a
    transfer problem: it returns a failed record (and tells the receiver, so it falls back)."""

    backend: str

    def __init__(self, context: zmq.Context) -> None:
        self.context = context
        self._sockets: dict[str, zmq.Socket] = {}

    def send(self, request_id: str, cache: torch.Tensor, src_block_ids: list[int],
             reservation: KVReservationMsg, first_token_id: int, first_logprobs=None) -> TransferRecord:
        """Write blocks ``src_block_ids[k:]`` of ``cache`` into ``reservation.block_ids[k:]``, where
        ``k = reservation.num_cached_tokens // block_size`` (the receiver's own prefix-cache hits)."""
        block_size = cache.shape[3]
        skip = reservation.num_cached_tokens // block_size
        src = list(src_block_ids[skip:])
        dst = list(reservation.block_ids[skip:])
        t0 = time.perf_counter()
        notice = KVTransferDone(request_id, True, dst, first_token_id, first_logprobs)
        try:
            if len(src) != len(dst):
                raise ValueError(f"{len(src)} blocks to send but {len(dst)} reserved")
            if reservation.deadline_unix_s and time.time() > reservation.deadline_unix_s:
                raise TimeoutError("reservation deadline passed before the send")
            notice.kv_bytes = len(src) * block_bytes(cache)
            self._send(cache, src, reservation, notice)
            return TransferRecord(request_id, self.backend, len(dst), notice.kv_bytes, time.perf_counter() - t0)
        except (ValueError, OSError, RuntimeError, TimeoutError, zmq.ZMQError) as e:
            logger.warning("KV transfer of %s to %s failed: %s", request_id, reservation.target.worker_id, e)
            self._notify(reservation.target.address,
                         KVTransferDone(request_id, False, dst, error=str(e)), [])
            return TransferRecord(request_id, self.backend, len(dst), 0, time.perf_counter() - t0,
                                  ok=False, error=str(e))

    @abc.abstractmethod
    def _send(self, cache: torch.Tensor, src: list[int], reservation: KVReservationMsg,
              notice: KVTransferDone) -> None:
        """Move the data and send ``notice`` (with any frames); raise on failure."""

    def _notify(self, address: str, notice: KVTransferDone, frames: list) -> None:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)  # close() still delivers queued notices
            sock.setsockopt(zmq.SNDTIMEO, 5000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(address)
            self._sockets[address] = sock
        notice.num_frames = len(frames)
        if not frames:
            sock.send(encode(notice))
            return
        tracker = sock.send_multipart([encode(notice), *frames], copy=False, track=True)
        tracker.wait(30.0)  # the frames are out of our buffers (and timed honestly)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()  # with the socket's linger: queued notices still go out
        self._sockets.clear()


def make_receiver(backend: str, context: zmq.Context, worker_id: str, host: str = "127.0.0.1",
                  port: int = 0) -> KVReceiver:
    if backend == "shm":
        from pdserve.kv.shm import ShmReceiver
        return ShmReceiver(context, worker_id, host, port)
    if backend == "tcp":
        from pdserve.kv.tcp import TcpReceiver
        return TcpReceiver(context, worker_id, host, port)
    raise ValueError(f"kv backend must be one of {KV_BACKENDS}, got {backend!r}")


def make_sender(backend: str, context: zmq.Context) -> KVSender:
    if backend == "shm":
        from pdserve.kv.shm import ShmSender
        return ShmSender(context)
    if backend == "tcp":
        from pdserve.kv.tcp import TcpSender
        return TcpSender(context)
    raise ValueError(f"kv backend must be one of {KV_BACKENDS}, got {backend!r}")


# ---- tensor helpers (the only torch in the data plane) ----------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def block_bytes(cache: torch.Tensor) -> int:
    """Bytes of one block across all layers, keys and values."""
    return cache.shape[0] * cache.shape[1] * cache[0, 0, 0].numel() * cache.element_size()


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` runs where both id lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
    """``dst[:, :, dst_ids] = src[:, :, src_ids]`` as strided copies over runs (no gather temporary)."""
    for s, d, n in block_runs(src_ids, dst_ids):
        # (num_layers, 2, n, block_size, num_kv_heads, head_dim)
        dst[:, :, d:d + n].copy_(src[:, :, s:s + n])


def gather_blocks(src: torch.Tensor, src_ids: list[int]) -> torch.Tensor:
    """The blocks ``src_ids`` as one contiguous tensor (num_layers, 2, len(src_ids), ...)."""
    out = torch.empty((src.shape[0], src.shape[1], len(src_ids), *src.shape[3:]), dtype=src.dtype)
    copy_blocks(out, list(range(len(src_ids))), src, src_ids)
    return out


def block_digest(cache: torch.Tensor, block_id: int) -> str:
    """SHA-256 of one block's bytes over all layers, keys and values (KV integrity checks)."""
    import hashlib

    data = cache[:, :, block_id].contiguous()  # (num_layers, 2, block_size, num_kv_heads, head_dim)
    return hashlib.sha256(data.view(-1).view(torch.uint8).numpy()).hexdigest()


def tensor_from_buffer(buffer: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A read-only view of received bytes as a flat tensor (no copy)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the buffer is read-only; we only read it
        return torch.frombuffer(buffer, dtype=dtype)


def bind_socket(socket: zmq.Socket, host: str, port: int = 0) -> str:
    """Bind to ``host:port`` (port 0: one the OS picks); return the address peers should connect to."""
    if port:
        socket.bind(f"tcp://{host}:{port}")
    else:
        port = socket.bind_to_random_port(f"tcp://{host}")
    if host in ("0.0.0.0", "*", "::"):
        import socket as _socket
        host = _socket.gethostname()
    return f"tcp://{host}:{port}"
