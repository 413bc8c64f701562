"""Internal sockets beyond loopback (security.py): a worker bound on every interface speaks CURVE with its
cluster's keys only. A raw connection without keys, or with another cluster's, gets no answer; one with the
cluster's keys is served. Without keys, a worker refuses to bind beyond loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import zmq

from pdserve import protocol as p
from pdserve.security import ENV, ClusterKeys

from test_server_worker import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


def _worker(tiny, tmp_path, keys: ClusterKeys | None, host="0.0.0.0"):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if keys is not None:
        env[ENV] = keys.to_env()
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.worker.main", "--role", "decode", "--host", host,
                             "--model", str(tiny), "--load-format", "dummy", "--num-kv-blocks", "16",
                             "--kv-connector", "tcp", "--ready-file", str(ready)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _ask(port: int, keys: ClusterKeys | None, server_public: bytes | None = None) -> bool:
    """Whether a DEALER (with these client keys) gets a WorkerInfo for its Hello within 3 s."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey = server_public or keys.server_public
        sock.curve_publickey, sock.curve_secretkey = keys.client_public, keys.client_secret
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(p.encode(p.Hello("intruder" if keys is None else "frontend")))
        return bool(sock.poll(3000)) and isinstance(p.decode_from_worker(sock.recv()), p.WorkerInfo)
    finally:
        sock.close(0)
        ctx.term()


def test_only_the_clusters_keys_get_an_answer(tiny, tmp_path):
    keys = ClusterKeys.generate()
    proc, ready = _worker(tiny, tmp_path, keys)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        port = int(json.loads(ready.read_text())["address"].rsplit(":", 1)[1])
        assert not _ask(port, None)  # no keys: refused before any message reaches pdserve
        other = ClusterKeys.generate()
        assert not _ask(port, other, server_public=keys.server_public)  # another cluster's client key
        assert _ask(port, keys)  # the cluster's own
        assert proc.poll() is None  # and the worker goes on
    finally:
        proc.terminate()
        proc.wait(30)


def test_no_keys_no_bind_beyond_loopback(tiny, tmp_path):
    proc, _ = _worker(tiny, tmp_path, None)
    assert proc.wait(120) != 0
    assert "need the cluster's keys" in proc.stderr.read()
