"""Every cross-process message survives encode -> decode unchanged, on the channel it travels."""
from __future__ import annotations

import msgspec
import pytest

from pdserve import protocol as p

_TARGET = p.KVTarget("decode-1", "shm", "tcp://127.0.0.1:5000", "host-a", [30, 2, 8, 16, 3, 64], "float32",
                     {"path": "/dev/shm/pdserve-kv-1-ab"})
_AUTO = p.KVTarget("decode-1", "auto", "", "node-a", [30, 2, 8, 16, 3, 64], "float32",
                   alternatives=[_TARGET, p.KVTarget("decode-1", "tcp", "tcp://10.0.0.2:5001", "node-a")])
_RESERVATION = p.KVReservationMsg("r1", [4, 5, 6], 16, _TARGET, 1234.5)
_LOGPROBS = [p.LogprobEntry(7, -0.25, 1, [7, 9], [-0.25, -1.5])]

TO_WORKER = [
    p.Hello("fe1"),
    p.AddRequest("r1", [1, 2, 3], p.WireSamplingParams(temperature=0.0, max_tokens=4, stop_token_ids=[2],
                                                        logprobs=2, seed=7), remote_kv=True),
    p.AddRequest("r2", [1], p.WireSamplingParams(), hold_kv=True),
    p.Abort(["r1", "r2"]),
    p.FailRemoteKV("r1", "prefill worker died"),
    p.ForwardReservation(_RESERVATION),
    p.KVDigestRequest("q1", [2**63 - 1, -5, 0]),
    p.Shutdown(),
    p.Configure(role="prefill", cpus=[1], set_step_target=True, step_target_s=0.04),
    p.Configure(cpus=[], set_step_target=True),  # park, and no step target
    p.CheckIntegrity("q2"),
]
FROM_WORKER = [
    p.WorkerInfo("decode-1", "decode", "smollm2-135m", 123, "host", 16, 1000, 8192, "shm", [2]),
    p.WorkerInfo("decode-1", "decode", "smollm2-135m", 123, "host", 16, 1000, 8192, "shm", [2], [0, 1], 0.04),
    p.WorkerInfo("decode-1", "decode", "smollm2-135m", 123, "host", 16, 1000, 8192, device="cuda",
                 device_name="NVIDIA H100 80GB HBM3", hardware="h100-sxm"),
    p.WorkerInfo("both-1", "both", "smollm2-135m", 123, "host", 16, 1000, 8192, device="cpu",
                 device_name="AMD EPYC 9R14", num_cores=2, hardware="cpu-this-machine"),
    p.WorkerInfo("decode-2", "decode", "smollm2-135m", 123, "host", 16, 2000, 8192, kv_dtype="float8_e4m3fn"),
    p.Outputs([p.TokenOutput("r1", [5], None, None, 3, 0, _LOGPROBS), p.TokenOutput("r2", [], "abort")]),
    p.Outputs([p.TokenOutput("r3", [9, 10], "stop", 10, 3, 16)]),
    p.ErrorMsg("r1", "invalid_request_error", "prompt too long", "prompt", 400),
    p.ErrorMsg(None, "internal_error", "malformed message", http_status=500),
    p.Stats("decode-1", "decode", 1.5, 1, 2, 3, 0.5, 100, 50, 64, 32, 1, 640, 20, 0, 4, 1, 2048, 0.01),
    p.Stats("decode-1", "decode", 1.5, queued_prefill_tokens=300, prefill_token_s=4e-4, decode_step_s=0.02,
            step_target_s=0.04, cpus=[0]),
    p.Stats("decode-1", "decode", 1.5, busy_s=12.5, prefill_busy_s=3.25, uptime_s=60.0, core_s=90.0),
    p.KVEvents("decode-1", [1, -2, 2**63 - 1], [3]),
    _RESERVATION,
    p.KVReservationMsg("r2", [4], 0, _AUTO),
    p.PrefillDone("r1", True, 7, 16, 4096, 0.002),
    p.PrefillDone("r2", False, error="reservation deadline passed"),
    p.KVDigestReply("decode-1", "q1", ["ab" * 32, ""]),
    p.IntegrityReply("decode-1", "q2"),
    p.IntegrityReply("decode-1", "q2", "AssertionError: (3, 4)"),
]
KV_PLANE = [
    p.KVTransferDone("r1", True, [5, 6], 7, _LOGPROBS, 4096, 1),
    p.KVTransferDone("r2", False, error="aborted"),
    p.KVTransferDone("r3", True, [5, 6], 7, streamed=True),
    p.KVLayerData("r3", 4, 5, [5, 6], 1),
]


@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda m: type(m).__name__)
def test_to_worker_round_trip(msg):
    assert p.decode_to_worker(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", FROM_WORKER, ids=lambda m: type(m).__name__)
def test_from_worker_round_trip(msg):
    assert p.decode_from_worker(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", KV_PLANE, ids=lambda m: type(m).__name__)
def test_kv_plane_round_trip(msg):
    assert p.decode_kv_plane(p.encode(msg)) == msg


def test_heartbeat_round_trip():
    beat = p.Heartbeat("decode-1", 1234.5)
    assert p.decode_heartbeat(p.encode(beat)) == beat
    hello = p.Hello("fe", "tcp://127.0.0.1:5555")
    assert p.decode_to_worker(p.encode(hello)) == hello


def test_every_message_type_is_covered_with_a_unique_one_byte_tag():
    covered = {type(m) for m in TO_WORKER + FROM_WORKER + KV_PLANE} | {p.Heartbeat}
    assert covered == set(p.MESSAGE_TYPES)
    tags = [t.__struct_config__.tag for t in p.MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    assert all(isinstance(t, int) and 0 <= t < 128 for t in tags)  # msgpack positive fixint: one byte


def test_additive_change_old_reader_ignores_new_fields():
    class StatsV2(msgspec.Struct, tag=23, tag_field="t"):
        worker_id: str
        role: str
        time_s: float
        brand_new_field: int = 42

    data = msgspec.msgpack.encode(StatsV2("w", "both", 1.0))
    assert p.decode_from_worker(data) == p.Stats("w", "both", 1.0)


def test_malformed_and_wrong_channel_raise_value_errors():
    with pytest.raises(ValueError):
        p.decode_to_worker(b"\xc1garbage")
    with pytest.raises(ValueError):  # a worker->frontend message is not valid on the control channel in
        p.decode_to_worker(p.encode(p.KVEvents("w", [], [])))
    with pytest.raises(ValueError):  # wrong field type
        p.decode_to_worker(msgspec.msgpack.encode({"t": 2, "request_id": 1, "prompt_token_ids": [],
                                                   "params": {}}))
