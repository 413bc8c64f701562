"""An out-of-tree KV connector, as a third party would write one: the KV of a remote prefill travels through
files in a directory (the target's ``address``), no socket at all. pdserve finds it by ``module:Class``
(``--kv-connector file_kv_connector:FileKVConnector``) with no change to pdserve itself; it uses only the
connector seam's public pieces (``pdserve.kv.connector``, ``pdserve.kv.base``, ``pdserve.kv.blocks``).

A save writes ``<rid>.kv`` (the blocks, gathered) and then ``<rid>.done`` (the notice, msgpack), each by an
atomic rename; the target's ``poll_loads`` looks for the notices of the reservations it expects.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from pdserve.kv.base import ConnectorCapabilities, LoadDone, SaveDone
from pdserve.kv.blocks import check_layout, copy_blocks, dtype_name, gather_blocks
from pdserve.kv.connector import KVConnector, SaveJob, ThreadedSaves
from pdserve.protocol import KVReservationMsg, KVTarget, KVTransferDone, decode_kv_plane, encode


class FileKVConnector(KVConnector):
    capabilities = ConnectorCapabilities(is_target=True)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.dir: Path | None = None
        self._expected: dict[str, KVReservationMsg] = {}
        self._saves: ThreadedSaves | None = None

    # -- target side -------------------------------------------------------------------------------------
    def listen(self) -> None:
        base = Path(os.environ.get("PDSERVE_FILE_KV_DIR") or tempfile.gettempdir())
        self.dir = base / f"file-kv-{self.config.worker_id}-{os.getpid()}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def target(self) -> KVTarget:
        return KVTarget(self.config.worker_id, self.name, str(self.dir), socket.gethostname(),
                        list(self.cache.shape), dtype_name(self.cache.dtype))

    def expect(self, reservation: KVReservationMsg) -> None:
        self._expected[reservation.request_id] = reservation

    def cancel(self, request_id: str) -> None:
        self._expected.pop(request_id, None)
        self._remove(request_id)

    def poll_loads(self) -> list[LoadDone]:
        done = []
        for rid, reservation in list(self._expected.items()):
            notice_path = self.dir / f"{rid}.done"
            if not notice_path.exists():
                continue
            del self._expected[rid]
            notice = decode_kv_plane(notice_path.read_bytes())
            load = LoadDone(rid, notice.ok, notice.first_token_id, notice.first_logprobs, notice.kv_bytes,
                            notice.error)
            skip = reservation.num_cached_tokens // self.cache.shape[3]
            if load.ok and notice.dst_block_ids != reservation.block_ids[skip:]:
                load.ok, load.error = False, "the notice names blocks other than the reserved ones"
            if load.ok:
                data = torch.load(self.dir / f"{rid}.kv")  # (layers, 2, n, block_size, kv_heads, head_dim)
                copy_blocks(self.cache, notice.dst_block_ids, data, list(range(data.shape[2])))
            self._remove(rid)
            done.append(load)
        return done

    # -- source side -------------------------------------------------------------------------------------
    def start_save(self, job: SaveJob, cache: torch.Tensor) -> None:
        self._thread().submit(job, cache)

    def poll_saves(self) -> list[SaveDone]:
        return self._saves.poll() if self._saves is not None else []

    def refuse(self, reservation: KVReservationMsg, reason: str) -> None:
        notice = KVTransferDone(reservation.request_id, False, error=reason)
        self._thread().run(lambda: _write(Path(reservation.target.address) / f"{reservation.request_id}.done",
                                          encode(notice)))

    def wait_handles(self) -> list:
        return [self._saves.wake_fd] if self._saves is not None else []

    def close(self) -> None:
        if self._saves is not None:
            self._saves.close()
        if self.dir is not None:
            for f in self.dir.glob("*"):
                f.unlink(missing_ok=True)
            self.dir.rmdir()

    # -- private -------------------------------------------------------------------------------------------
    def _thread(self) -> ThreadedSaves:
        if self._saves is None:
            self._saves = ThreadedSaves("file-kv-save", self._send)
        return self._saves

    def _send(self, job: SaveJob, cache: torch.Tensor) -> SaveDone:
        r = job.reservation
        skip = r.num_cached_tokens // cache.shape[3]
        src, dst = job.src_block_ids[skip:], r.block_ids[skip:]
        folder = Path(r.target.address)
        try:
            if len(src) != len(dst):
                raise ValueError(f"{len(src)} blocks to send but {len(dst)} reserved")
            if time.time() > r.deadline_unix_s:
                raise TimeoutError("the reservation's deadline passed")
            check_layout(cache, r.target.shape, r.target.dtype)
            data = gather_blocks(cache, src)
            tmp = folder / f"{job.request_id}.kv.tmp"
            torch.save(data, tmp)
            tmp.rename(folder / f"{job.request_id}.kv")
            nbytes = data.numel() * data.element_size()
            _write(folder / f"{job.request_id}.done",
                   encode(KVTransferDone(job.request_id, True, dst, job.first_token_id, job.first_logprobs, nbytes)))
            return SaveDone(job.request_id, True, nbytes, num_blocks=len(dst), target_worker_id=r.target.worker_id)
        except (OSError, ValueError, TimeoutError) as e:
            _write(folder / f"{job.request_id}.done", encode(KVTransferDone(job.request_id, False, error=str(e))))
            return SaveDone(job.request_id, False, error=str(e), target_worker_id=r.target.worker_id)

    def _remove(self, rid: str) -> None:
        for suffix in (".kv", ".done"):
            (self.dir / f"{rid}{suffix}").unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
