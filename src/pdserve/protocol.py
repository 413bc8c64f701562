"""Every message that crosses a process boundary in pdserve, as msgspec structs.

Rules: plain fields only (ints, floats, strings, lists, nested structs of the same kind); each message
carries a one-byte integer type tag (msgpack positive fixint) in field ``t``; changes are additive (a new
field gets a default, so old peers keep decoding what they know; unknown fields are ignored).

Channels:

- control, frontend <-> worker (ZMQ DEALER -> worker's ROUTER): ``Hello``, ``AddRequest``, ``Abort``,
  ``FailRemoteKV``, ``ForwardReservation``, ``KVDigestRequest``, ``Configure``, ``Shutdown`` one way; ``WorkerInfo``, ``Outputs``,
  ``ErrorMsg``, ``Stats``, ``KVEvents``, ``KVReservationMsg``, ``PrefillDone``, ``KVDigestReply`` back.
- KV data plane, prefill worker -> decode worker, owned by the KV connector (kv/): the built-in connectors
  send ``KVTransferDone`` over ZMQ PUSH -> PULL (tcp: followed by the block data as raw frames), layer-wise
  streams send ``KVLayerData`` ahead of it as each layer is computed; others may
  carry it their own way. No tensors ever travel on the control channel.

This module imports nothing of pdserve's: every package may import it.
"""
from __future__ import annotations

from typing import Union

import msgspec

ROLES = ("prefill", "decode", "both")  # a worker's role: its engine does prefill, decode, or both

# ---- shared pieces --------------------------------------------------------------------------------------


class WireSamplingParams(msgspec.Struct, omit_defaults=True):
    """The engine-side fields of ``pdserve.SamplingParams``; stop strings stay at the frontend."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Union[int, None] = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: Union[int, None] = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Union[int, None] = None


class LogprobEntry(msgspec.Struct, array_like=True):
    """One sampled token's log-probability, its rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class TokenOutput(msgspec.Struct, omit_defaults=True):
    """One request's delta after one engine step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: Union[str, None] = None  # "stop" | "length" | "abort" | None
    stop_reason: Union[int, str, None] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: Union[list[LogprobEntry], None] = None


class KVTarget(msgspec.Struct, omit_defaults=True):
    """Where a decode worker's KV cache can be reached by a prefill worker.

    ``connector``: the name of the KV connector the decode worker runs (a registry name such as ``shm``, or
    ``module:Class``); the prefill worker sends with the same connector. ``address``: the decode worker's
    KV data-plane endpoint; ``host``: its host name; ``shape``/``dtype``: its cache layout, which a sender
    checks against its own; ``params``: connector-specific strings (the shm connector's file path).
    ``host`` names the node (``kv.connector.node_name``: the host name, or the node a launcher such as Ray
    placed the worker on). ``alternatives``: a target that can receive in several ways (the ``auto``
    connector: shared memory within a node, TCP across nodes) lists one target per way; the sender picks."""

    worker_id: str
    connector: str
    address: str
    host: str = ""
    shape: list[int] = []
    dtype: str = ""
    params: dict[str, str] = {}
    alternatives: list[KVTarget] = []


# ---- frontend -> worker ---------------------------------------------------------------------------------


class Hello(msgspec.Struct, tag=1, tag_field="t", omit_defaults=True):
    """``heartbeat_address``: where the worker pushes ``Heartbeat``s from a thread of their own (a long step
    does not delay them; a stopped or dead process sends none)."""

    frontend_id: str
    heartbeat_address: str = ""


class Heartbeat(msgspec.Struct, tag=29, tag_field="t"):
    """Worker -> frontend, on the heartbeat channel, every ``HEARTBEAT_S``."""

    worker_id: str
    time_s: float


HEARTBEAT_S = 0.5


class AddRequest(msgspec.Struct, tag=2, tag_field="t", omit_defaults=True):
    """``remote_kv``: decode role, reserve blocks and wait for the prompt's KV from a prefill worker.
    ``hold_kv``: prefill role, keep the prompt's blocks until sent to the reservation forwarded later."""

    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    remote_kv: bool = False
    hold_kv: bool = False


class Abort(msgspec.Struct, tag=3, tag_field="t"):
    request_ids: list[str]


class FailRemoteKV(msgspec.Struct, tag=4, tag_field="t"):
    """Frontend -> decode worker: the prefill side gave up; compute the prompt locally."""

    request_id: str
    reason: str = ""


class ForwardReservation(msgspec.Struct, tag=5, tag_field="t"):
    """Frontend -> prefill worker: where to send the request's KV (the decode worker's reservation)."""

    reservation: KVReservationMsg


class KVDigestRequest(msgspec.Struct, tag=6, tag_field="t"):
    """Debug: digests of the cached blocks with these hashes (KV integrity checks)."""

    query_id: str
    block_hashes: list[int]


class Shutdown(msgspec.Struct, tag=7, tag_field="t"):
    pass


class CheckIntegrity(msgspec.Struct, tag=9, tag_field="t"):
    """Debug: run the engine's KV bookkeeping check (free + cached + used == total, reference counts)."""

    query_id: str


class Configure(msgspec.Struct, tag=8, tag_field="t", omit_defaults=True):
    """Frontend -> worker (the elastic controller): change the worker's role, cores or step target; fields
    left unset stay as they are. ``cpus`` empty parks the worker (nothing new is routed to it; what it runs
    finishes). ``step_target_s`` (with ``set_step_target``): stall-free chunking's target, None for none.
    The worker answers with its ``WorkerInfo``."""

    role: Union[str, None] = None
    cpus: Union[list[int], None] = None
    set_step_target: bool = False
    step_target_s: Union[float, None] = None


# ---- worker -> frontend ---------------------------------------------------------------------------------


class WorkerInfo(msgspec.Struct, tag=20, tag_field="t", omit_defaults=True):
    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    model: str
    pid: int
    host: str
    block_size: int
    num_blocks: int
    max_model_len: int
    kv_connector: str = ""
    eos_token_ids: list[int] = []
    cpus: Union[list[int], None] = None  # the cores it runs on ([] parked; None: not pinned)
    step_target_s: Union[float, None] = None
    device: str = ""  # "cpu", "cuda", ... (worker/busy.py)
    device_name: str = ""  # "NVIDIA H100 80GB HBM3", the CPU's model name
    num_cores: int = 0  # a CPU worker: the cores it may run on unless pinned (``cpus``); 0: an accelerator
    hardware: str = ""  # the hardware catalogue entry the device stands for (its price), "" if none
    kv_dtype: str = ""  # its KV cache's dtype ("bfloat16", "float8_e4m3fn", ...); "" from older workers


class Outputs(msgspec.Struct, tag=21, tag_field="t"):
    outputs: list[TokenOutput]


class ErrorMsg(msgspec.Struct, tag=22, tag_field="t", omit_defaults=True):
    """A request (or, with no request id, a message) the worker refused; the worker goes on."""

    request_id: Union[str, None]
    error_type: str  # "invalid_request_error" | "overloaded" | "internal_error"
    message: str
    param: Union[str, None] = None
    http_status: int = 400


class Stats(msgspec.Struct, tag=23, tag_field="t", omit_defaults=True):
    """Periodic snapshot (also the heartbeat); counters are totals since start."""

    worker_id: str
    role: str
    time_s: float
    num_running: int = 0
    num_waiting: int = 0
    num_awaiting_kv: int = 0
    kv_usage: float = 0.0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_held_kv: int = 0  # prefill role: requests holding blocks until their transfer
    num_transfers: int = 0  # prefill role: KV transfers sent (ok)
    num_failed_transfers: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_s: float = 0.0
    # What path choice and the elastic controller read (router/path.py, control/): the engine's learned
    # step costs, its queue, its step target and cores.
    queued_prefill_tokens: int = 0
    prefill_token_s: float = 0.0  # 0: not measured yet
    decode_step_s: float = 0.0
    step_target_s: Union[float, None] = None
    cpus: Union[list[int], None] = None
    busy_s: float = 0.0  # seconds inside engine steps
    prefill_busy_s: float = 0.0  # the part of busy_s spent on prefill (sim/cost.py: step_prefill_share)
    uptime_s: float = 0.0  # seconds since the worker's engine was ready (what its device is paid for)
    core_s: float = 0.0  # a CPU worker: core-seconds since ready (its cores over time; none while parked)
    # The KV store (kv/store/), when the worker uses one: each tier, and the save queue.
    kv_store: list[KVStoreTierStats] = []
    kv_store_save_drops: int = 0  # saves dropped because the queue was full
    kv_store_queued_bytes: int = 0
    kv_store_loaded_tokens: int = 0  # prompt tokens loaded from the store instead of computed
    step_overhead_s: float = 0.0  # between two forward passes of a busy engine (the prefill budget leaves it)


class KVStoreTierStats(msgspec.Struct, omit_defaults=True):
    """One KV store tier as a worker uses it (kv/store/): counters since start (blocks, bytes, seconds), its
    use now. ``hits``/``misses``: blocks found / not found there by this worker's loads."""

    tier: str  # "host" | "disk" | "remote"
    hits: int = 0
    misses: int = 0
    load_bytes: int = 0
    load_s: float = 0.0
    num_loads: int = 0
    save_bytes: int = 0
    save_s: float = 0.0
    num_saves: int = 0
    evictions: int = 0
    errors: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0


class KVEvents(msgspec.Struct, tag=24, tag_field="t", omit_defaults=True):
    """Block hashes this worker's prefix cache stored / evicted since its last KVEvents; with ``tier``, what
    this worker stored in (or evicted from) a KV store tier at ``location`` (a host name for the host and disk
    tiers, the store's URL for the remote one)."""

    worker_id: str
    stored: list[int]
    evicted: list[int]
    tier: str = ""
    location: str = ""


class KVReservationMsg(msgspec.Struct, tag=25, tag_field="t", omit_defaults=True):
    """Decode worker -> frontend (-> prefill worker): blocks reserved for a request's prompt.

    The sender fills ``block_ids[num_cached_tokens // block_size:]``; ``deadline_unix_s``: after it
    the decode worker computes the prompt itself, and the sender must not write any more."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int
    target: KVTarget
    deadline_unix_s: float = 0.0


class PrefillDone(msgspec.Struct, tag=26, tag_field="t", omit_defaults=True):
    """Prefill worker -> frontend: a request's KV was sent (ok) or could not be (error)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    num_cached_tokens: int = 0
    kv_bytes: int = 0
    transfer_s: float = 0.0
    error: str = ""


class KVDigestReply(msgspec.Struct, tag=27, tag_field="t"):
    worker_id: str
    query_id: str
    digests: list[str]  # hex digest per hash, "" where the block is not cached


class IntegrityReply(msgspec.Struct, tag=28, tag_field="t", omit_defaults=True):
    worker_id: str
    query_id: str
    error: str = ""  # "" when the check passed


# ---- prefill worker -> decode worker (KV data plane) ------------------------------------------------------


class KVTransferDone(msgspec.Struct, tag=40, tag_field="t", omit_defaults=True):
    """The KV of ``dst_block_ids`` is written (shm) or follows as frames (tcp), then the first token.

    tcp: ``num_frames`` frames follow, together the blocks in ``dst_block_ids`` order, each frame shaped
    ``(num_layers, 2, n, block_size, num_kv_heads, head_dim)`` for its share ``n`` of the blocks.
    ``ok`` false: the sender failed; the receiver falls back to local prefill."""

    request_id: str
    ok: bool
    dst_block_ids: list[int] = []
    first_token_id: int = -1
    first_logprobs: Union[list[LogprobEntry], None] = None
    kv_bytes: int = 0
    num_frames: int = 0
    error: str = ""
    checksum: Union[int, None] = None  # of the blocks' data as sent (kv/faults.py: verification is opt-in)
    streamed: bool = False  # the blocks came layer by layer before this notice (``KVLayerData``); no frames


class KVLayerData(msgspec.Struct, tag=41, tag_field="t", omit_defaults=True):
    """Layers ``[layer_start, layer_end)`` of ``dst_block_ids``, sent as soon as the prefill worker computed
    them (layer-wise streaming), before the request's ``KVTransferDone`` (``streamed``). tcp: ``num_frames``
    frames follow, together shaped ``(layer_end - layer_start, 2, len(dst_block_ids), block_size,
    num_kv_heads, head_dim)`` split along the blocks; shm writes in place and sends none of these."""

    request_id: str
    layer_start: int
    layer_end: int
    dst_block_ids: list[int]
    num_frames: int = 0


ToWorker = Union[Hello, AddRequest, Abort, FailRemoteKV, ForwardReservation, KVDigestRequest, Shutdown, Configure,
                 CheckIntegrity]
FromWorker = Union[WorkerInfo, Outputs, ErrorMsg, Stats, KVEvents, KVReservationMsg, PrefillDone,
                   KVDigestReply, IntegrityReply]
KVPlane = Union[KVTransferDone, KVLayerData]
_heartbeat = msgspec.msgpack.Decoder(Heartbeat)

MESSAGE_TYPES: tuple[type, ...] = (Hello, AddRequest, Abort, FailRemoteKV, ForwardReservation,
                                   KVDigestRequest, Shutdown, Configure, CheckIntegrity, WorkerInfo, Outputs,
                                   ErrorMsg, Stats, KVEvents, KVReservationMsg, PrefillDone, KVDigestReply,
                                   IntegrityReply, Heartbeat, KVTransferDone, KVLayerData)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
_kv_plane = msgspec.msgpack.Decoder(KVPlane)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_worker(data: bytes | memoryview) -> ToWorker:
    """Raises ``msgspec.DecodeError`` (a ValueError) on malformed input."""
    return _to_worker.decode(data)


def decode_from_worker(data: bytes | memoryview) -> FromWorker:
    return _from_worker.decode(data)


def decode_heartbeat(data: bytes | memoryview) -> Heartbeat:
    return _heartbeat.decode(data)


def decode_kv_plane(data: bytes | memoryview) -> KVPlane:
    return _kv_plane.decode(data)
