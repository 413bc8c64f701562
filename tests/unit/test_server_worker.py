"""Workers end to end at the protocol level, with tiny random engines in threads (no HTTP, no real model):
disaggregated prefill -> decode over shm and tcp gives the colocated tokens with bit-identical KV; bad
messages get errors back and the worker goes on; aborted reservations are always freed."""
from __future__ import annotations

import json
import threading
import time

import pytest
import zmq

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.core import EngineCore
from pdserve import protocol as p
from pdserve.worker.process import Worker, WorkerOptions

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 160, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": True, "rope_theta": 10000.0, "torch_dtype": "float32"}
PROMPT = list(range(3, 3 + 37))  # 2 full blocks of 16 and a partial one
GREEDY = p.WireSamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


def _engine(tiny_dir, alloc=None, device="cpu", dtype="auto", kv_cache_dtype="auto"):
    config = EngineConfig(model=ModelConfig(model=str(tiny_dir), load_format="dummy", device=device, dtype=dtype,
                                            seed=7),
                          cache=CacheConfig(block_size=16, num_blocks=24, kv_cache_dtype=kv_cache_dtype),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    return EngineCore(config, alloc, record_kv_events=True)


class Running:
    """A worker running its loop in a thread, and a DEALER connected to it (the test is the frontend)."""

    def __init__(self, tiny_dir, role, backend="shm", transfer_timeout_s=30.0, trace_path=None, device="cpu",
                 dtype="auto", kv_cache_dtype="auto"):
        options = WorkerOptions(role=role, kv_connector=backend, stats_interval_s=0.05,
                                transfer_timeout_s=transfer_timeout_s, idle_poll_ms=10, trace_path=trace_path)
        self.worker = Worker(None, options, engine_factory=lambda alloc: _engine(tiny_dir, alloc, device, dtype,
                                                                                 kv_cache_dtype))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.worker.address)
        self.backlog: list = []
        self.send(p.Hello("test"))
        assert isinstance(self.recv_type(p.WorkerInfo), p.WorkerInfo)

    def send(self, msg):
        self.sock.send(p.encode(msg))

    def recv_type(self, cls, timeout_s=30.0):
        """The next message of type ``cls``; messages of other types wait in a backlog for their turn
        (Stats, being periodic, are dropped once skipped)."""
        for i, msg in enumerate(self.backlog):
            if isinstance(msg, cls):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = p.decode_from_worker(self.sock.recv())
                if isinstance(msg, cls):
                    return msg
                if not isinstance(msg, (p.Stats, p.KVEvents)):
                    self.backlog.append(msg)
        raise AssertionError(f"no {cls.__name__} within {timeout_s}s; other messages: {self.backlog}")

    def tokens(self, request_id, timeout_s=30.0):
        ids = []
        while True:
            for out in self.recv_type(p.Outputs, timeout_s).outputs:
                assert out.request_id == request_id
                ids += out.new_token_ids
                if out.finish_reason:
                    return ids, out.finish_reason

    def wait_stats(self, pred, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.recv_type(p.Stats)
            if pred(stats):
                return stats
        raise AssertionError("stats never matched")

    def close(self):
        self.worker.stop()
        self.thread.join(10)
        self.worker.close()
        self.sock.close(0)


@pytest.fixture(scope="module")
def colocated_tokens(tiny_dir):
    w = Running(tiny_dir, "both")
    try:
        w.send(p.AddRequest("c1", PROMPT, GREEDY))
        ids, reason = w.tokens("c1")
        assert reason == "length" and len(ids) == 6
        return ids
    finally:
        w.close()


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_disaggregated_equals_colocated_with_identical_kv(tiny_dir, colocated_tokens, backend):
    prefill, decode = Running(tiny_dir, "prefill"), Running(tiny_dir, "decode", backend)
    try:
        for rid in ("r1", "r2"):  # r2: the decode worker already caches the prompt's 2 full blocks
            decode.send(p.AddRequest(rid, PROMPT, GREEDY, remote_kv=True))
            prefill.send(p.AddRequest(rid, PROMPT, p.WireSamplingParams(temperature=0.0, max_tokens=1,
                                                                        ignore_eos=True), hold_kv=True))
            reservation = decode.recv_type(p.KVReservationMsg)
            assert reservation.request_id == rid and reservation.target.connector == backend
            assert len(reservation.block_ids) == 3
            assert reservation.num_cached_tokens == (0 if rid == "r1" else 32)
            prefill.send(p.ForwardReservation(reservation))
            done = prefill.recv_type(p.PrefillDone)
            assert done.ok and done.transfer_s > 0
            assert done.kv_bytes == (3 if rid == "r1" else 1) * decode.worker.core.kv_bytes_per_block
            ids, reason = decode.tokens(rid)
            assert ids == colocated_tokens and reason == "length"
        q = p.KVDigestRequest("q", _prompt_hashes())
        prefill.send(q)
        decode.send(q)
        a, b = prefill.recv_type(p.KVDigestReply), decode.recv_type(p.KVDigestReply)
        assert len(a.digests) == 2 and all(a.digests) and a.digests == b.digests
        for w in (prefill, decode):
            w.wait_stats(lambda s: s.num_free_blocks == s.num_blocks and s.num_held_kv == 0)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_fp8_kv_disaggregated_equals_colocated_fp8_at_half_the_bytes(tiny_dir, backend):
    """--kv-cache-dtype fp8 on both workers: the decode worker's tokens are the colocated fp8 engine's, the
    prompt's blocks arrive byte for byte, and a transfer moves half the bytes of the bfloat16 cache's."""
    kv_bytes, tokens = {}, {}
    for kv in ("auto", "fp8"):
        both = Running(tiny_dir, "both", dtype="bfloat16", kv_cache_dtype=kv)
        try:
            both.send(p.AddRequest("c", PROMPT, GREEDY))
            colocated, _ = both.tokens("c")
        finally:
            both.close()
        prefill = Running(tiny_dir, "prefill", dtype="bfloat16", kv_cache_dtype=kv)
        decode = Running(tiny_dir, "decode", backend, dtype="bfloat16", kv_cache_dtype=kv)
        try:
            assert decode.worker.info().kv_dtype == ("float8_e4m3fn" if kv == "fp8" else "bfloat16")
            decode.send(p.AddRequest("r", PROMPT, GREEDY, remote_kv=True))
            prefill.send(p.AddRequest("r", PROMPT, p.WireSamplingParams(temperature=0.0, max_tokens=1,
                                                                        ignore_eos=True), hold_kv=True))
            prefill.send(p.ForwardReservation(decode.recv_type(p.KVReservationMsg)))
            done = prefill.recv_type(p.PrefillDone)
            assert done.ok, done.error
            kv_bytes[kv] = done.kv_bytes
            tokens[kv], _ = decode.tokens("r")
            assert tokens[kv] == colocated
            q = p.KVDigestRequest("q", _prompt_hashes())
            prefill.send(q)
            decode.send(q)
            a, b = prefill.recv_type(p.KVDigestReply), decode.recv_type(p.KVDigestReply)
            assert len(a.digests) == 2 and all(a.digests) and a.digests == b.digests
        finally:
            prefill.close()
            decode.close()
    assert kv_bytes["fp8"] * 2 == kv_bytes["auto"] > 0


def test_disaggregated_on_a_device_plugin(tiny_dir, testchip):
    """Both workers on the out-of-tree ``testchip`` backend (tests/conftest.py, found by its entry point): the
    KV moves through shared memory by the plugin's block copies, and the tokens are the CPU's."""
    cpu = Running(tiny_dir, "both", dtype="float32")
    try:
        cpu.send(p.AddRequest("c", PROMPT, GREEDY))
        cpu_ids, _ = cpu.tokens("c")
    finally:
        cpu.close()
    prefill = Running(tiny_dir, "prefill", device="testchip", dtype="float32")
    decode = Running(tiny_dir, "decode", "shm", device="testchip", dtype="float32")
    try:
        assert decode.worker.core.backend.name == "testchip" and decode.worker.device.device_name == "TestChip T1"
        decode.send(p.AddRequest("r", PROMPT, GREEDY, remote_kv=True))
        prefill.send(p.AddRequest("r", PROMPT, p.WireSamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                                  hold_kv=True))
        prefill.send(p.ForwardReservation(decode.recv_type(p.KVReservationMsg)))
        assert prefill.recv_type(p.PrefillDone).ok
        assert decode.tokens("r") == (cpu_ids, "length")
        assert testchip.CALLS["copy_blocks"] >= 1 and testchip.CALLS["attention"] >= 2 * 6  # layers x steps
    finally:
        prefill.close()
        decode.close()


def test_traced_workers_record_steps_transfers_and_first_tokens(tiny_dir, tmp_path):
    from pdserve.tracing import read_trace
    prefill = Running(tiny_dir, "prefill", trace_path=tmp_path / "p.jsonl")
    decode = Running(tiny_dir, "decode", trace_path=tmp_path / "d.jsonl")
    try:
        decode.send(p.AddRequest("r1", PROMPT, GREEDY, remote_kv=True))
        prefill.send(p.AddRequest("r1", PROMPT, p.WireSamplingParams(temperature=0.0, max_tokens=1,
                                                                     ignore_eos=True), hold_kv=True))
        prefill.send(p.ForwardReservation(decode.recv_type(p.KVReservationMsg)))
        assert prefill.recv_type(p.PrefillDone).ok
        assert len(decode.tokens("r1")[0]) == 6
    finally:
        prefill.close()
        decode.close()
    pe, de = read_trace(tmp_path / "p.jsonl"), read_trace(tmp_path / "d.jsonl")
    assert pe[0]["ev"] == "start" and de[0]["ev"] == "start"
    steps = [e for e in pe if e["ev"] == "step"]
    assert [s["chunks"] for s in steps] == [[[0, 37, 1]]]  # the whole prompt in one step, sampling
    assert steps[0]["t"] <= steps[0]["s"] <= steps[0]["e"] <= steps[0]["x"]
    send = next(e for e in pe if e["ev"] == "kv_send")
    assert send["rid"] == "r1" and send["tokens"] == 48 and send["bytes"] > 0 and send["s"] <= send["e"]
    assert {e["ev"] for e in pe} >= {"add", "reservation"}
    steps = [e for e in de if e["ev"] == "step"]
    assert [s["chunks"] for s in steps] == [[[37 + i, 1, 1]] for i in range(5)]  # five decodes after KV
    kinds = [e["ev"] for e in de]
    assert kinds.index("add") < kinds.index("reserve") < kinds.index("kv_recv") < kinds.index("first")


def test_bad_messages_get_errors_and_worker_goes_on(tiny_dir, colocated_tokens):
    w = Running(tiny_dir, "both")
    try:
        w.sock.send(b"\xc1 not msgpack")
        assert w.recv_type(p.ErrorMsg).request_id is None
        w.send(p.AddRequest("empty", [], GREEDY))
        err = w.recv_type(p.ErrorMsg)
        assert err.request_id == "empty" and err.http_status == 400 and err.param == "prompt"
        w.send(p.AddRequest("bad-params", PROMPT, p.WireSamplingParams(top_p=0.0)))
        assert w.recv_type(p.ErrorMsg).param == "top_p"
        w.send(p.AddRequest("too-long", list(range(5, 150)) * 2, GREEDY))
        assert w.recv_type(p.ErrorMsg).http_status == 400
        w.send(p.AddRequest("ok", PROMPT, GREEDY))
        w.send(p.AddRequest("ok", PROMPT, GREEDY))  # duplicate id while the first runs
        assert w.recv_type(p.ErrorMsg).request_id == "ok"
        assert w.tokens("ok")[0] == colocated_tokens
    finally:
        w.close()


def test_aborted_reservation_is_freed_once_sender_answers(tiny_dir):
    prefill, decode = Running(tiny_dir, "prefill"), Running(tiny_dir, "decode", "shm")
    try:
        decode.send(p.AddRequest("a1", PROMPT, GREEDY, remote_kv=True))
        reservation = decode.recv_type(p.KVReservationMsg)
        decode.send(p.Abort(["a1"]))
        # shm: the blocks stay reserved while a prefill worker might still be writing into them ...
        decode.wait_stats(lambda s: s.num_free_blocks == s.num_blocks - 3)
        # ... until the prefill worker (which never heard of a1) answers the reservation with a failure.
        prefill.send(p.ForwardReservation(reservation))
        decode.wait_stats(lambda s: s.num_free_blocks == s.num_blocks and s.num_awaiting_kv == 0)
    finally:
        prefill.close()
        decode.close()


def test_transfer_timeout_falls_back_to_local_prefill(tiny_dir, colocated_tokens):
    decode = Running(tiny_dir, "decode", "tcp", transfer_timeout_s=0.3)
    try:
        decode.send(p.AddRequest("t1", PROMPT, GREEDY, remote_kv=True))
        decode.recv_type(p.KVReservationMsg)  # and no prefill worker ever sends anything
        ids, reason = decode.tokens("t1")
        assert ids == colocated_tokens
    finally:
        decode.close()


def test_fail_remote_kv_before_reservation(tiny_dir, colocated_tokens):
    decode = Running(tiny_dir, "decode", "shm")
    try:
        decode.send(p.AddRequest("f1", PROMPT, GREEDY, remote_kv=True))
        decode.send(p.FailRemoteKV("f1", "prefill refused"))
        ids, _ = decode.tokens("f1")
        assert ids == colocated_tokens
        decode.wait_stats(lambda s: s.num_awaiting_kv == 0 and s.num_running == 0)
    finally:
        decode.close()


def _prompt_hashes():
    from pdserve.hashing import hash_block_tokens

    return hash_block_tokens(PROMPT, 16)


def test_reservation_waits_for_free_blocks(tiny_dir):
    decode = Running(tiny_dir, "decode", "tcp")
    try:
        # a local request holds 15 to 16 of the 24 blocks until it finishes ...
        decode.send(p.AddRequest("big", [3 + i % 150 for i in range(230)],
                                 p.WireSamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)))
        decode.recv_type(p.Outputs)
        # ... so a remote prompt needing 10 blocks waits (not dropped) and is reserved once they are free.
        decode.send(p.AddRequest("r", [5 + i % 150 for i in range(150)], GREEDY, remote_kv=True))
        finished = False
        while True:
            msg = p.decode_from_worker(decode.sock.recv())
            if isinstance(msg, p.Outputs) and any(o.request_id == "big" and o.finish_reason for o in msg.outputs):
                finished = True
            if isinstance(msg, p.ErrorMsg):
                raise AssertionError(msg)
            if isinstance(msg, p.KVReservationMsg):
                assert finished, "reserved before the blocks were free"
                assert msg.request_id == "r" and len(msg.block_ids) == 10
                break
    finally:
        decode.close()


def test_configure_changes_role_cores_and_step_target_between_steps(tiny_dir, colocated_tokens):
    import os

    w = Running(tiny_dir, "prefill", "tcp")
    try:
        core = sorted(os.sched_getaffinity(0))[0]
        w.send(p.Configure(role="decode", cpus=[core], set_step_target=True, step_target_s=0.05))
        info = w.recv_type(p.WorkerInfo)
        assert (info.role, info.cpus, info.step_target_s) == ("decode", [core], 0.05)
        w.wait_stats(lambda s: s.role == "decode" and s.cpus == [core] and s.step_target_s == 0.05)
        w.send(p.AddRequest("c1", PROMPT, GREEDY))  # a former prefill worker now decodes: same tokens
        assert w.tokens("c1")[0] == colocated_tokens
        w.send(p.Configure(cpus=[core]))  # cores again: its learned step costs are rescaled, not forgotten
        assert w.recv_type(p.WorkerInfo).cpus == [core]
        w.send(p.AddRequest("c2", PROMPT, GREEDY))
        assert w.tokens("c2")[0] == colocated_tokens
        w.send(p.Configure(cpus=[], set_step_target=True))  # parked, no step target
        info = w.recv_type(p.WorkerInfo)
        assert info.cpus == [] and info.step_target_s is None
        w.send(p.Configure(role="chef"))
        assert "role must be one of" in w.recv_type(p.ErrorMsg).message
    finally:
        w.close()


@pytest.mark.parametrize("fault", ["kv_drop=1", "kv_corrupt=1", "kv_delay_s=0.5"])
def test_faulty_transfers_fall_back_with_the_right_tokens_and_no_leak(tiny_dir, colocated_tokens, fault, monkeypatch):
    """Dropped, corrupted and delayed transfers (kv/faults.py): the decode worker computes the prompt itself
    when the KV does not arrive or fails its checksum; the tokens are the colocated ones; every block is free."""
    monkeypatch.setenv("PDSERVE_FAULTS", fault)
    prefill = Running(tiny_dir, "prefill")  # its connectors read the fault plan
    monkeypatch.delenv("PDSERVE_FAULTS")
    if "corrupt" in fault:
        monkeypatch.setenv("PDSERVE_KV_VERIFY", "1")  # the decode side verifies what the sender checksummed
    decode = Running(tiny_dir, "decode", "tcp", transfer_timeout_s=1.0)
    try:
        decode.send(p.AddRequest("f", PROMPT, GREEDY, remote_kv=True))
        prefill.send(p.AddRequest("f", PROMPT, p.WireSamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                                  hold_kv=True))
        prefill.send(p.ForwardReservation(decode.recv_type(p.KVReservationMsg)))
        ids, reason = decode.tokens("f")
        assert ids == colocated_tokens and reason == "length"
        for w in (prefill, decode):
            w.wait_stats(lambda s: s.num_free_blocks == s.num_blocks and s.num_held_kv == 0 and s.num_awaiting_kv == 0)
    finally:
        prefill.close()
        decode.close()
