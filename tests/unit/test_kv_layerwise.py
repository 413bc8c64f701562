"""Layer-wise KV streaming: a prompt's KV goes to the decode worker layer by layer, chunk by chunk, as the
prefill worker computes it, and lands bit-identical to a whole-request transfer (also with prefix hits on the
decode side); a stream cut between layers falls back to a local prefill with the right tokens and no block
leaked. The bookkeeping (``kv.layerwise``) is checked job by job; the ``auto`` connector picks shared memory
within a node and TCP across nodes; a device cache's staging path runs here on CPU."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from pdserve import protocol as p
from pdserve.kv.auto import AutoConnector
from pdserve.kv.connector import ConnectorConfig, KVConnector, NODE_ENV, SaveJob
from pdserve.kv.layerwise import LayerwiseSaves
from pdserve.kv.registry import make_connector
from pdserve.kv.staging import Staging
from pdserve.worker.process import Worker, WorkerOptions
from test_server_worker import Running, _engine, tiny_dir  # noqa: F401  (tiny_dir: a fixture)

LONG_PROMPT = [3 + (i * 7) % 150 for i in range(150)]  # 3 chunks of 64 tokens; 10 blocks, the last partial
GREEDY = p.WireSamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
FIRST_ONLY = p.WireSamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class _Worker(Running):
    """``Running`` with the options this module varies (layer-wise on or off)."""

    def __init__(self, tiny_dir, role, backend="shm", transfer_timeout_s=30.0, layerwise=True):
        options = WorkerOptions(role=role, kv_connector=backend, stats_interval_s=0.05, idle_poll_ms=10,
                                transfer_timeout_s=transfer_timeout_s, kv_layerwise=layerwise)
        self.worker = Worker(None, options, engine_factory=lambda alloc: _engine(tiny_dir, alloc))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.worker.address)
        self.backlog = []
        self.send(p.Hello("test"))
        assert isinstance(self.recv_type(p.WorkerInfo), p.WorkerInfo)


@pytest.fixture(scope="module")
def long_tokens(tiny_dir):
    w = _Worker(tiny_dir, "both")
    try:
        w.send(p.AddRequest("c", LONG_PROMPT, GREEDY))
        return w.tokens("c")[0]
    finally:
        w.close()


def _disaggregated(prefill, decode, rid):
    """The reservation goes out before the prefill worker starts computing: every layer of every chunk can
    stream. Returns the tokens and the prefill side's PrefillDone."""
    decode.send(p.AddRequest(rid, LONG_PROMPT, GREEDY, remote_kv=True))
    reservation = decode.recv_type(p.KVReservationMsg)
    prefill.send(p.AddRequest(rid, LONG_PROMPT, FIRST_ONLY, hold_kv=True))
    prefill.send(p.ForwardReservation(reservation))  # handled before the first step: the stream opens first
    done = prefill.recv_type(p.PrefillDone)
    ids, _ = decode.tokens(rid)
    return ids, done, reservation


def _digests(w):
    from pdserve.hashing import hash_block_tokens

    w.send(p.KVDigestRequest("q", hash_block_tokens(LONG_PROMPT, 16)))
    return w.recv_type(p.KVDigestReply).digests


def _idle(*workers):
    for w in workers:
        w.wait_stats(lambda s: s.num_free_blocks == s.num_blocks and s.num_held_kv == 0 and s.num_awaiting_kv == 0)


@pytest.mark.parametrize("backend", ["tcp", "shm", "auto"])
def test_layerwise_and_whole_transfers_deliver_identical_kv(tiny_dir, long_tokens, backend):
    digests = {}
    for layerwise in (True, False):
        prefill = _Worker(tiny_dir, "prefill", layerwise=layerwise)
        decode = _Worker(tiny_dir, "decode", backend)
        try:
            for rid in ("a", "b"):  # b: the decode worker holds the prompt's first 9 blocks already
                ids, done, reservation = _disaggregated(prefill, decode, rid)
                assert ids == long_tokens and done.ok
                assert reservation.num_cached_tokens == (0 if rid == "a" else 144)
                num_blocks = 10 - reservation.num_cached_tokens // 16
                assert done.kv_bytes == num_blocks * decode.worker.core.kv_bytes_per_block
            jobs = prefill.worker.layer_saves.num_layer_jobs
            assert (jobs > 0) == layerwise  # 2 layers x 3 chunks for a, 2 x 1 for b
            a, b = _digests(prefill), _digests(decode)
            assert len(b) == 9 and all(b) and a == b  # the full blocks, bit-identical on both sides
            digests[layerwise] = b
            _idle(prefill, decode)
        finally:
            prefill.close()
            decode.close()
    assert digests[True] == digests[False]


def test_stream_cut_between_layers_falls_back_with_the_right_tokens_and_no_leak(tiny_dir, long_tokens, monkeypatch):
    monkeypatch.setenv("PDSERVE_FAULTS", "kv_cut_layer=1")  # layer 0 of each chunk goes, layer 1 never does
    prefill = _Worker(tiny_dir, "prefill", "tcp")  # its own connector (made now, with the faults) sends
    monkeypatch.delenv("PDSERVE_FAULTS")
    decode = _Worker(tiny_dir, "decode", "tcp")
    try:
        ids, done, _ = _disaggregated(prefill, decode, "cut")
        assert not done.ok and "cut" in done.error
        assert ids == long_tokens  # computed on the decode worker
        _idle(prefill, decode)
        ids, done, _ = _disaggregated(prefill, decode, "after")  # the decode worker caches it now: 1 block
        assert ids == long_tokens
    finally:
        prefill.close()
        decode.close()


def test_a_reservation_that_arrives_during_the_step_streams_the_layers_after_it(tiny_dir):
    """A prompt computed in one step: its reservation, arriving while the step runs, is taken between two layers
    (not after the step, when every layer would be done and go as one job), so each layer goes as it is
    computed; the decode worker's tokens equal a colocated worker's."""
    prompt = LONG_PROMPT[:60]  # one chunk: one step
    both = _Worker(tiny_dir, "both")
    try:
        both.send(p.AddRequest("ref", prompt, GREEDY))
        want = both.tokens("ref")[0]
    finally:
        both.close()
    decode = _Worker(tiny_dir, "decode", "tcp", transfer_timeout_s=120.0)  # a fallback would show as a timeout
    options = WorkerOptions(role="prefill", kv_connector="tcp", stats_interval_s=0.05, idle_poll_ms=10)
    prefill = Worker(None, options, engine_factory=lambda alloc: _engine(tiny_dir, alloc))  # its loop: below
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(prefill.address)
    thread = None
    try:
        decode.send(p.AddRequest("r", prompt, GREEDY, remote_kv=True))
        reservation = decode.recv_type(p.KVReservationMsg)
        sock.send(p.encode(p.AddRequest("r", prompt, FIRST_ONLY, hold_kv=True)))
        assert prefill.control.poll(10_000)
        prefill._drain_control()  # the request is registered; its reservation is not there yet
        sock.send(p.encode(p.ForwardReservation(reservation)))
        assert prefill.control.poll(10_000)  # waiting in the socket when the step starts
        num_layers = prefill.core.kv_cache.shape[0]
        outputs = prefill._step()  # the whole prompt, layer by layer; the reservation is read at the first layer's end
        assert prefill.layer_saves.num_layer_jobs == num_layers  # one job per layer, none left for after
        prefill._route_outputs(outputs)  # as the loop does after a step: the prompt is computed, its save starts
        thread = threading.Thread(target=prefill.run, daemon=True)
        thread.start()
        assert decode.tokens("r", timeout_s=20)[0] == want  # the KV came (no local prefill after a deadline)
        sock.poll(10_000)
        done = p.decode_from_worker(sock.recv())
        while not isinstance(done, p.PrefillDone):
            assert sock.poll(10_000)
            done = p.decode_from_worker(sock.recv())
        assert done.ok and done.kv_bytes > 0
    finally:
        prefill.stop()
        if thread is not None:
            thread.join(10)
        prefill.close()
        sock.close(0)
        decode.close()


# -- the bookkeeping, job by job --------------------------------------------------------------------------
class _Recorder(KVConnector):
    """Records the layer jobs it is handed (the seam's save-a-layer call), moves nothing."""

    def __init__(self):
        super().__init__(ConnectorConfig("rec"))
        self.jobs = []

    def save_layer(self, job, cache):
        self.jobs.append((job.layer_start, job.layer_end, job.src_block_ids, job.dst_block_ids))

    def target(self): ...
    def expect(self, reservation): ...
    def cancel(self, request_id): ...
    def poll_loads(self): return []
    def start_save(self, job, cache): ...
    def poll_saves(self): return []
    def refuse(self, reservation, reason): ...


def _reservation(num_cached_tokens=0, blocks=tuple(range(100, 105))):
    return p.KVReservationMsg("r", list(blocks), num_cached_tokens, p.KVTarget("d", "rec", ""))


def _step(saves, start, n, blocks):
    if saves.begin_step([("r", start, n, blocks)]):
        for layer in range(3):
            saves.layer_done(layer)


def test_layer_jobs_follow_the_compute_chunk_by_chunk():
    saves, rec = LayerwiseSaves(torch.zeros(3, 2, 8, 4, 1, 2)), _Recorder()  # 3 layers, blocks of 4 tokens
    saves.track("r")
    saves.open("r", rec, _reservation())
    _step(saves, 0, 6, [0, 1])  # tokens 0-5: blocks 0 and (half of) 1
    _step(saves, 6, 6, [0, 1, 2])  # tokens 6-11: block 1 again (now full), block 2
    _step(saves, 12, 5, [0, 1, 2, 3, 4])  # tokens 12-16: blocks 3, 4 (one token)
    assert rec.jobs == [(0, 1, [0, 1], [100, 101]), (1, 2, [0, 1], [100, 101]), (2, 3, [0, 1], [100, 101]),
                        (0, 1, [1, 2], [101, 102]), (1, 2, [1, 2], [101, 102]), (2, 3, [1, 2], [101, 102]),
                        (0, 1, [3, 4], [103, 104]), (1, 2, [3, 4], [103, 104]), (2, 3, [3, 4], [103, 104])]
    assert saves.finish("r", [0, 1, 2, 3, 4])
    assert not saves.finish("r", [0, 1, 2, 3, 4, 5])  # a block it never computed


def test_a_late_reservation_catches_up_then_streams_and_skips_the_targets_hits():
    saves, rec = LayerwiseSaves(torch.zeros(3, 2, 8, 4, 1, 2)), _Recorder()
    saves.track("r")
    _step(saves, 4, 8, [5, 6, 7])  # a local prefix hit (block 5), then tokens 4-11 computed, no stream yet
    saves.open("r", rec, _reservation(num_cached_tokens=4))  # the target holds block 0 (its own hit)
    assert rec.jobs == [(0, 3, [6, 7], [101, 102])]  # every layer of what is computed, in one job
    _step(saves, 12, 5, [5, 6, 7, 1, 2])
    assert rec.jobs[1:] == [(0, 1, [1, 2], [103, 104]), (1, 2, [1, 2], [103, 104]), (2, 3, [1, 2], [103, 104])]
    assert saves.finish("r", [5, 6, 7, 1, 2])


def test_a_recomputed_prompt_is_sent_whole():
    saves, rec = LayerwiseSaves(torch.zeros(3, 2, 8, 4, 1, 2)), _Recorder()
    saves.track("r")
    saves.open("r", rec, _reservation())
    _step(saves, 0, 8, [0, 1])
    _step(saves, 0, 17, [3, 4, 5, 6, 7])  # preempted, recomputed into other blocks
    assert len(rec.jobs) == 3  # nothing more streams
    assert not saves.finish("r", [3, 4, 5, 6, 7])
    saves.forget("r")
    assert "r" not in saves and len(saves) == 0


# -- a device cache's staging path, on CPU ------------------------------------------------------------------
def test_staging_path_round_trips_blocks_and_layers():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(4, 2, 10, 4, 2, 8, generator=g).to(torch.bfloat16)
    direct, staged = Staging("cpu"), Staging("cpu", staged=True)
    assert not direct.staged and staged.staged and staged.mark() is None
    for layers in (slice(None), slice(1, 3)):
        a = direct.to_host(cache, [7, 2, 3], layers)
        b = staged.to_host(cache, [7, 2, 3], layers)
        assert torch.equal(a, b) and torch.equal(b, cache[layers][:, :, [7, 2, 3]])
        out = torch.zeros_like(cache)
        staged.from_host(out, [0, 5, 6], b, layers)
        assert torch.equal(out[layers][:, :, [0, 5, 6]], cache[layers][:, :, [7, 2, 3]])
        assert not out[:, :, [1, 2, 3, 4, 7, 8, 9]].any()


def test_tcp_stream_through_the_staging_path(monkeypatch):
    """A layer-wise TCP transfer with both ends on the accelerator's path (gather on the device, a separate host
    buffer each way): the target's blocks equal the source's, bit for bit."""
    monkeypatch.setattr(Staging, "for_cache", classmethod(lambda cls, cache: cls(cache.device, staged=True)))
    shape = (3, 2, 12, 4, 2, 8)
    src_cache = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    target = make_connector("tcp", ConnectorConfig("d"))
    target.listen()
    target.register_cache(torch.zeros(shape))
    source = make_connector("tcp", ConnectorConfig("p"))
    try:
        r = p.KVReservationMsg("r", [0, 5, 6, 1], 4, target.target(), time.time() + 30)
        target.expect(r)
        saves = LayerwiseSaves(src_cache)
        saves.track("r")
        saves.open("r", source, r)
        _run_steps(saves, [(0, 9, [7, 2, 3]), (9, 7, [7, 2, 3, 9])])
        assert saves.finish("r", [7, 2, 3, 9])
        source.start_save(SaveJob("r", [7, 2, 3, 9], r, 42, streamed=True), src_cache)
        load = _one_load(target)
        assert load.ok and load.first_token_id == 42, load
        assert torch.equal(target.cache[:, :, [5, 6, 1]], src_cache[:, :, [2, 3, 9]])
        assert not target.cache[:, :, [0, 2, 3, 4, 7, 8, 9, 10, 11]].any()
    finally:
        source.close()
        target.close()


def _run_steps(saves, steps):
    for start, n, blocks in steps:
        if saves.begin_step([("r", start, n, blocks)]):
            for layer in range(saves.num_layers):
                saves.layer_done(layer)


def _one_load(conn, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = conn.poll_loads()
        if got:
            return got[0]
        time.sleep(0.01)
    raise AssertionError("no load")


# -- the auto connector: the way is chosen by where the two ends run -------------------------------------
@pytest.mark.parametrize("same_node", [True, False])
def test_auto_connector_picks_shared_memory_within_a_node_and_tcp_across(monkeypatch, same_node):
    shape = (3, 2, 12, 4, 2, 8)
    monkeypatch.setenv(NODE_ENV, "node-a")
    target = AutoConnector(ConnectorConfig("d"))
    target.name = "auto"
    target.listen()
    target.register_cache(target.allocate_cache(shape, torch.float32))
    src_cache = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    try:
        advertised = target.target()
        assert [a.connector for a in advertised.alternatives] == ["shm", "tcp"]
        assert all(a.host == "node-a" for a in advertised.alternatives)
        monkeypatch.setenv(NODE_ENV, "node-a" if same_node else "node-b")
        source = AutoConnector(ConnectorConfig("p"))
        source.name = "auto"
        source.register_cache(src_cache)
        assert source.route_name(advertised, src_cache) == ("shm" if same_node else "tcp")
        r = p.KVReservationMsg("r", [0, 5, 6], 0, advertised, time.time() + 30)
        target.expect(r)
        source.start_save(SaveJob("r", [7, 2, 3], r, 5), src_cache)
        load = _one_load(target)
        assert load.ok, load
        assert torch.equal(target.cache[:, :, [0, 5, 6]], src_cache[:, :, [7, 2, 3]])
        source.close()
    finally:
        target.close()
