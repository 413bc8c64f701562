"""What the frontend keeps of its workers and requests, and their wire forms (``server/client.py`` uses them)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
import zmq.asyncio

from pdserve import protocol as p
from pdserve.control.attainment import Objectives
from pdserve.control.controller import Bounds
from pdserve.errors import InvalidRequestError, OverloadedError, PdserveError
from pdserve.sampling_params import SamplingParams

MAX_ITLS = 64  # gaps between tokens kept per request for the ITL percentile


@dataclass(frozen=True)
class FrontendOptions:
    worker_addresses: tuple[str, ...]
    routing: str = "prefix_aware"
    prefix_load_weight: float = 1.0
    min_remote_prefill_tokens: int = 0
    worker_timeout_s: float = 30.0  # a worker silent this long is dead (its process is checked sooner)
    connect_timeout_s: float = 600.0  # how long start() waits for every worker's first answer
    max_inflight: int = 1024
    max_inflight_per_instance: int = 256
    retry_dead_worker: bool = True  # re-send a request that has produced no token yet to another worker
    trace_path: str | None = None  # event trace (tracing.py): submits and first tokens
    objectives: Objectives = Objectives()  # SLOs: their rolling attainment is kept (and exported)
    attainment_window_s: float = 30.0
    path_choice: bool = False  # per request, remote or local prefill by predicted TTFT (router/path.py)
    elastic: bool = False  # run the elastic controller (control/controller.py) on the workers
    elastic_tick_s: float = 2.0
    elastic_initial: str = "split"  # server/elastic.py INITIAL_LAYOUTS
    bounds: Bounds = Bounds()
    request_timeout_s: float | None = 600.0  # every request's deadline (aborted everywhere then; None: none)
    migrate: bool = True  # a dead decode worker's streaming requests go on on another one
    internal_host: str = "127.0.0.1"  # where workers reach this frontend (heartbeats)
    admission_ttft_slack: float | None = None  # refuse requests predicted over slack x the TTFT objective


@dataclass
class WorkerConn:
    address: str
    socket: zmq.asyncio.Socket
    info: p.WorkerInfo | None = None
    stats: p.Stats | None = None
    last_seen_s: float = 0.0
    is_alive: bool = False


@dataclass
class RequestEvent:
    """A delta for one sub-request (``output``), or its error."""

    index: int
    request_id: str
    output: p.TokenOutput | None = None
    error: PdserveError | None = None


@dataclass
class Tracked:
    """What the frontend keeps of a request to build worker messages and feed its stream."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: p.WireSamplingParams
    queue: asyncio.Queue
    is_finished: bool = False
    has_first_token: bool = False
    submitted_s: float = 0.0
    first_s: float = 0.0
    last_s: float = 0.0
    num_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between tokens (the first MAX_ITLS)
    predicted_ttft_s: float | None = None
    is_remote: bool | None = None
    deadline_s: float | None = None
    num_original_prompt: int = 0
    generated: list[int] = field(default_factory=list)  # its tokens so far (a migration resends them)



def wire_params(sp: SamplingParams) -> p.WireSamplingParams:
    return p.WireSamplingParams(sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed, sp.repetition_penalty,
                                sp.frequency_penalty, sp.presence_penalty, sp.max_tokens, sp.min_tokens,
                                list(sp.stop_token_ids), sp.ignore_eos, sp.logprobs)


def prefill_params(w: p.WireSamplingParams) -> p.WireSamplingParams:
    """The prefill worker samples only the first token."""
    return msgspec.structs.replace(w, max_tokens=1, min_tokens=min(w.min_tokens, 1))


def error_from_msg(msg: p.ErrorMsg) -> PdserveError:
    if msg.http_status == 400:
        return InvalidRequestError(msg.message, msg.param)
    if msg.http_status in (429, 503) and msg.error_type == "overloaded":
        return OverloadedError(msg.message)
    err = PdserveError(msg.message)
    err.http_status = msg.http_status
    err.error_type = msg.error_type
    return err
