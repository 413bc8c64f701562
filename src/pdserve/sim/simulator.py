"""The discrete-event cluster simulator: pdserve's real scheduler and KV manager, modelled step times.

Each instance is an ``engine.scheduler.Scheduler`` over an ``engine.kv_manager.KVCacheManager`` sized
from memory (``perf_model.instance_kv_blocks``). An event loop replaces the model's execution by the
performance model: a step scheduled at time t ends at t + step_time(batch shape), and the scheduler is
updated with dummy sampled tokens (requests end by their max_tokens). Disaggregated clusters follow the
real flow (``server/client.py``, ``worker/process.py``): the request goes to a decode instance
(``add_request(remote_kv=True)``) and to a prefill instance (``max_tokens=1``, ``hold_kv``) at once; the
decode instance's reservation (``SchedulerOutput.reservations``) leaves when its step ends and reaches
the prefill instance; once the prompt is computed and the reservation is there, the KV moves (serialised
per prefill instance: the link model, or the fitted copy time of a live calibration), then
``release_kv`` on the prefill side and ``complete_remote_kv`` on the decode side, which emits the first
token. Workers read messages between steps, so a message that reaches a busy instance waits for its
step to end. Live overheads (``sim/overheads.py``), when the perf model has them, delay arrivals, slow
steps, and shift every token by the return path.

Two speed-ups, both measured against the plain mode (docs/sim.md):

- fast-forward (exact): when an instance only decodes and nothing waits, the next k steps are known; it
  commits them at once (same KV allocations, same step times, same token times) and is interrupted at
  the first step boundary after any event that concerns it;
- sampling (approximate): ``sample_instances`` simulates a representative slice of a large cluster (the
  same per-instance load: request i goes to the slice when i mod groups < slice), and scales throughputs
  back up.
"""
from __future__ import annotations

import heapq
import logging
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.engine.scheduler import SchedulerOutput
from pdserve.sim.cluster import ClusterSpec, PoolSpec
from pdserve.sim.cost import step_prefill_share
from pdserve.sim.hardware import Hardware, load_catalogue
from pdserve.sim.instance import Instance, WorkItem
from pdserve.sim.models import ModelSpec, get_model
from pdserve.sim.overheads import Overheads, StepNoise
from pdserve.sim.perf_model import (AnalyticPerfModel, BatchShape, PerfModel, instance_kv_blocks,
                                    kv_transfer_s)
from pdserve.sim.requests import DUMMY_TOKEN_ID, SimRequest
from pdserve.sim.results import Recorder
from pdserve.sim.routing import make_chooser

logger = logging.getLogger(__name__)

_ARRIVAL, _STEP_END, _WINDOW_END, _RESUME, _TRANSFER_DONE, _MESSAGE = range(6)


@dataclass(frozen=True)
class SimOptions:
    """How to simulate (not what): performance model, speed-ups, checks."""

    perf_model: str = "analytic"  # or a calibrated model file written by `pdserve profile`
    hardware_file: str | None = None
    fast_forward: bool = True
    max_window_steps: int = 4096
    sample_instances: int | None = None  # simulate about this many instances of a larger cluster
    check_integrity: bool = False  # after every step (slow; tests)
    num_blocks: int | None = None  # KV blocks per instance instead of sizing from memory (tests)
    seed: int = 0  # of the step-time jitter draws (live calibrations with jitter only)
    progress: bool = False


@dataclass
class _Flight:
    """A disaggregated request between its arrival and its KV landing on the decode instance."""

    decode: Instance
    prefill: Instance
    num_cached_on_decode: int = 0
    is_prefilled: bool = False  # the prefill instance computed the prompt (and holds its KV)
    is_reserved: bool = False  # the decode instance's reservation reached the prefill instance


class Simulator:
    """Runs ``items`` through the cluster ``spec``; ``run()`` returns the result dict (bench JSON shape)."""

    def __init__(self, spec: ClusterSpec, items: Sequence[WorkItem], options: SimOptions | None = None,
                 concurrency: int | None = None, slo: tuple[float | None, float | None] = (None, None),
                 workload: dict | None = None) -> None:
        self.spec, self.options = spec, options or SimOptions()
        self.model: ModelSpec = get_model(spec.model)
        self.catalogue = load_catalogue(self.options.hardware_file)
        self.max_model_len = self.model.max_context
        self.scale, pools, keep = _sampling(spec, self.options.sample_instances)
        self.items = [it for it in items if keep(it.index)]
        self.concurrency = None if concurrency is None else max(1, math.ceil(concurrency / self.scale))
        self.pools: dict[str, list[Instance]] = {}
        for name, pool in pools.items():
            self.pools[name] = self._make_pool(name, pool)
        self.policy = make_chooser(spec.routing)
        self.decode_policy = make_chooser(spec.decode_routing, decode=True)
        self.recorder = Recorder(len(self.items), slo)
        self.workload = workload or {}
        self._events: list = []
        self._seq = 0
        self._flights: dict[str, _Flight] = {}
        self._next_item = 0
        self._transfer_inter = self._kv_link_is_inter()
        self.overheads: Overheads = self.instances[0].perf.overheads or Overheads()
        self.recorder.return_s = self.overheads.return_s
        # Contention between the instances of one host makes a step's time depend on the others: no
        # fast-forward then (such simulations are one host's few instances anyway).
        self._is_contention_sensitive = any(i.step_overhead is not None and i.step_overhead.is_contention_sensitive
                                            for i in self.instances) and len(self.instances) > 1
        # Jittered steps are drawn one by one (each instance its own seeded stream).
        self._is_jittered = any(i.step_overhead is not None and i.step_overhead.jitter for i in self.instances)
        self._fast_forward = self.options.fast_forward and not self._is_contention_sensitive and not self._is_jittered

    # -- public ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        progress = _progress(len(self.items), self.options.progress)
        if self.concurrency is None:
            admission = self.overheads.admission_s
            for slot, item in enumerate(self.items):
                self.recorder.send_s[slot] = item.arrival_s or 0.0
                self._push((item.arrival_s or 0.0) + admission, _ARRIVAL, slot)
            self._next_item = len(self.items)
        else:
            for _ in range(min(self.concurrency, len(self.items))):
                self._release_next(0.0)  # the first users send at once
        handlers = (self._on_arrival, self._on_step_end, self._on_window_end, self._on_resume, self._on_transfer_done,
                    self._on_message)
        events = self._events
        done_before = 0
        now = 0.0
        while events:
            now, _, kind, payload = heapq.heappop(events)
            handlers[kind](now, payload)
            if progress is not None and self.recorder.num_done - done_before >= 1000:
                progress.update(self.recorder.num_done - done_before)
                done_before = self.recorder.num_done
        if progress is not None:
            progress.update(self.recorder.num_done - done_before)
            progress.close()
        for inst in self.instances:
            inst.scheduler.check_integrity()
        return self._result()

    @property
    def instances(self) -> list[Instance]:
        return [inst for pool in self.pools.values() for inst in pool]

    # -- events ----------------------------------------------------------------------------------------
    def _on_arrival(self, now: float, slot: int) -> None:
        """The request reaches the workers (its send time, ``admission_s`` earlier, is recorded)."""
        item = self.items[slot]
        self.recorder.send(slot, self.recorder.send_s[slot], item.input_len, item.output_len)
        rid = str(slot)
        if item.input_len >= self.max_model_len:
            self._fail(slot, now, "prompt longer than the context length")
            return
        if self.spec.mode == "colocated":
            pool = self.pools["colocated"]
            req = self._request(rid, slot, item, item.output_len)
            if pool[0].kv.num_blocks_for(item.input_len + item.output_len) > pool[0].kv.num_blocks:
                self._fail(slot, now, "does not fit the KV cache")
                return
            inst = pool[self.policy.choose(pool, req.update_block_hashes(self.spec.block_size), 0)]
            inst.scheduler.add_request(req)
            self._wake(inst, now)
            return
        decode_pool, prefill_pool = self.pools["decode"], self.pools["prefill"]
        if (decode_pool[0].kv.num_blocks_for(item.input_len + item.output_len) > decode_pool[0].kv.num_blocks
                or prefill_pool[0].kv.num_blocks_for(item.input_len + 1) > prefill_pool[0].kv.num_blocks):
            self._fail(slot, now, "does not fit the KV cache")
            return
        req = self._request(rid, slot, item, item.output_len)
        hashes = req.update_block_hashes(self.spec.block_size)
        need = decode_pool[0].kv.num_blocks_for(item.input_len + 1)
        decode = decode_pool[self.decode_policy.choose(decode_pool, hashes, need)]
        prefill = prefill_pool[self.policy.choose(prefill_pool, hashes, 0)]
        self._flights[rid] = _Flight(decode, prefill)
        decode.scheduler.add_request(req, remote_kv=True)
        first = self._request(rid, slot, item, 1)
        first.hold_kv = True
        prefill.scheduler.add_request(first)
        self._wake(decode, now)
        self._wake(prefill, now)

    def _on_step_end(self, now: float, payload: tuple[Instance, SchedulerOutput]) -> None:
        inst, out = payload
        sampled = {c.request.request_id: DUMMY_TOKEN_ID for c in out.chunks if c.samples}
        outputs = inst.scheduler.update_from_output(out, sampled)
        if inst.role == "prefill":
            for o in outputs:  # max_tokens=1: every output finishes, its KV held for the transfer
                flight = self._flights[o.request_id]
                flight.is_prefilled = True
                if flight.is_reserved:
                    self._start_transfer(inst, o.request_id, o.num_prompt_tokens, now)
        else:
            self._record_tokens(inst, outputs, now)
        if self.options.check_integrity:
            inst.scheduler.check_integrity()
        self._boundary(inst, now)

    def _record_tokens(self, inst: Instance, outputs, now: float) -> None:
        rec = self.recorder
        step_start = inst.step_start
        num_continuing = 0
        for o in outputs:
            slot = int(o.request_id)
            if rec.num_tokens[slot] == 0:
                rec.first_token(slot, now, o.num_cached_tokens)
            elif rec.last_s[slot] == step_start:
                rec.num_tokens[slot] += 1
                rec.last_s[slot] = now
                num_continuing += 1
            else:
                rec.token(slot, now)
            if o.finished:
                self._complete(slot, now)
        if num_continuing:
            rec.add_itl(now - step_start, num_continuing)

    def _boundary(self, inst: Instance, now: float) -> None:
        """Between two steps, as a worker's loop: send what the step produced (reservations), read the
        messages that arrived during it, then start the next step."""
        if inst.outbox:
            delay = self.overheads.reservation_s
            for rid in inst.outbox:
                flight = self._flights[rid]
                self._push(now + delay, _MESSAGE, (flight.prefill, "reservation", rid))
            inst.outbox.clear()
        inst.busy = False
        inst.idle_since = now
        if inst.inbox:
            inbox, inst.inbox = inst.inbox, []
            for kind, rid in inbox:
                self._handle(inst, now, kind, rid)
        self._start_step(inst, now)

    def _on_window_end(self, now: float, payload: tuple[Instance, int]) -> None:
        inst, version = payload
        if version != inst.version:
            return
        self._commit_window(inst, len(inst.window[1]))
        inst.window_limit = min(self.options.max_window_steps, 2 * inst.window_limit)
        self._boundary(inst, now)

    def _on_resume(self, now: float, payload: tuple[Instance, int]) -> None:
        inst, version = payload
        if version != inst.version:
            return
        self._boundary(inst, now)

    def _on_transfer_done(self, now: float, rid: str) -> None:
        flight = self._flights[rid]
        flight.prefill.scheduler.release_kv(rid)
        if flight.prefill.scheduler.has_unfinished_requests():  # freed blocks may admit waiting prompts
            self._wake(flight.prefill, now)
        self._deliver(flight.decode, now, "kv", rid)

    def _on_message(self, now: float, payload: tuple[Instance, str, str]) -> None:
        inst, kind, rid = payload
        self._deliver(inst, now, kind, rid)

    def _deliver(self, inst: Instance, now: float, kind: str, rid: str) -> None:
        """A message reaches ``inst``: read now if it is idle, else when its step ends."""
        if inst.busy:
            inst.inbox.append((kind, rid))
            if inst.window is not None:
                self._wake(inst, now)  # cut the fast-forward window at the next step boundary
            return
        self._handle(inst, now, kind, rid)
        self._wake(inst, now)

    def _handle(self, inst: Instance, now: float, kind: str, rid: str) -> None:
        flight = self._flights[rid]
        if kind == "reservation":  # at the prefill instance
            flight.is_reserved = True
            if flight.is_prefilled:
                self._start_transfer(inst, rid, self.items[int(rid)].input_len, now)
            return
        assert kind == "kv", kind  # at the decode instance: the request joins its batch, first token out
        del self._flights[rid]
        out = inst.scheduler.complete_remote_kv(rid, DUMMY_TOKEN_ID)
        assert out is not None, rid
        slot = int(rid)
        self.recorder.first_token(slot, now, out.num_cached_tokens)
        if out.finished:
            self._complete(slot, now)

    # -- instance stepping -----------------------------------------------------------------------------
    def _wake(self, inst: Instance, now: float) -> None:
        """Something changed for ``inst`` at ``now``: start a step if idle, cut a fast-forward short."""
        if inst.window is not None:
            ends = inst.window[1]
            j = bisect_left(ends, now) + 1
            if j >= len(ends):
                return
            self._commit_window(inst, j)
            inst.window_limit = max(2, 2 * j)
            inst.version += 1
            self._push(ends[j - 1], _RESUME, (inst, inst.version))
            return
        if not inst.busy:
            self._start_step(inst, now)

    def _start_step(self, inst: Instance, now: float) -> None:
        if self._fast_forward and inst.role != "prefill" and self._try_window(inst, now):
            return
        out = inst.scheduler.schedule()
        for res in out.reservations:  # sent after the step (at once if there is no step)
            self._flights[res.request_id].num_cached_on_decode = res.num_cached_tokens
            inst.outbox.append(res.request_id)
        if out.is_empty:
            if inst.outbox:
                self._boundary(inst, now)
            return
        shape = BatchShape.from_chunks(out.chunks)
        dt = inst.perf.step_time_s(shape)
        if inst.step_overhead is not None:
            dt = inst.step_overhead.time_s(dt, shape.num_samples, self._is_contended(inst),
                                           inst.perf.prefill_part_s(shape) if shape.num_prefill_tokens else 0.0,
                                           sum(1 for c in out.chunks if _is_first_decode(c)),
                                           inst.noise.factor(now), inst.is_cold(now))
        inst.busy = True
        inst.step_start = now
        inst.num_steps += 1
        inst.busy_s += dt
        if shape.num_prefill_tokens:
            inst.prefill_busy_s += dt * step_prefill_share(inst.perf, shape)
        self._push(now + dt, _STEP_END, (inst, out))

    def _try_window(self, inst: Instance, now: float) -> bool:
        """Fast-forward k >= 2 pure-decode steps if nothing waits and no request can finish inside."""
        s = inst.scheduler
        if s.waiting or not s.running or len(s.running) > s.config.max_num_batched_tokens:
            return False
        running = s.running
        if inst.step_overhead is not None and inst.step_overhead.join_s and \
                any(r.num_computed_tokens == r.num_prompt_tokens for r in running):
            return False  # a request's first decode costs a join: stepped on its own
        if inst.step_overhead is not None and inst.step_overhead.cold_s and inst.is_cold(now):
            return False  # so does the first step after an idle spell
        k = inst.window_limit  # adaptive: doubles after a full window, shrinks after a cut one
        ctx = longest = 0
        max_len = self.max_model_len
        for r in running:
            c = r.num_computed_tokens
            n = r.num_tokens
            if n - c != 1 or not r.output_token_ids:  # the last token of a chunked prompt is no decode
                return False
            rem = min(r.max_tokens - len(r.output_token_ids), max_len - n) - 1
            if rem < k:
                k = rem
                if k < 2:
                    return False
            ctx += c + 1
            longest = max(longest, c + 1)
        bs = inst.block_size
        free = inst.kv.pool.num_free_blocks
        while k >= 2 and sum(-(-(r.num_computed_tokens + k) // bs) - -(-r.num_computed_tokens // bs)
                             for r in running) > free:
            k //= 2
        if k < 2:
            return False
        b = len(running)
        ends = []
        t = now
        step = inst.perf.decode_step_time_s
        live = inst.step_overhead
        for i in range(k):
            dt = step(b, ctx + b * i, longest + i)
            t += dt if live is None else live.time_s(dt, b)
            ends.append(t)
        inst.window = (now, ends, list(running))
        inst.busy = True
        inst.version += 1
        inst.num_steps += k
        inst.busy_s += t - now
        self._push(t, _WINDOW_END, (inst, inst.version))
        return True

    def _commit_window(self, inst: Instance, j: int) -> None:
        """Apply the first ``j`` steps of the instance's fast-forward window (what ``schedule`` +
        ``update_from_output`` would have done, step by step) and record their tokens."""
        t0, ends, reqs = inst.window
        kv = inst.kv
        rec = self.recorder
        last_s, num_tokens = rec.last_s, rec.num_tokens
        tail = [DUMMY_TOKEN_ID] * j
        num_continuing = 0
        for r in reqs:
            new = kv.allocate_slots(r, j)
            assert new is not None, "fast-forward window without blocks"
            r.num_computed_tokens += j
            r.output_token_ids.extend(tail)
            kv.cache_blocks(r, r.num_computed_tokens)
            slot = r.slot
            if last_s[slot] == t0:
                num_continuing += 1
            else:
                rec.add_itl(ends[0] - last_s[slot], 1)
            last_s[slot] = ends[j - 1]
            num_tokens[slot] += j
        if num_continuing:
            rec.add_itl(ends[0] - t0, num_continuing)
        b = len(reqs)
        for i in range(1, j):
            rec.add_itl(ends[i] - ends[i - 1], b)
        if j < len(ends):  # cut short: give back the busy time not spent
            inst.busy_s -= ends[-1] - ends[j - 1]
            inst.num_steps -= len(ends) - j
        inst.window = None

    def _is_contended(self, inst: Instance) -> bool:
        """Whether another instance of the host is in a step (only asked of calibrated live models)."""
        return self._is_contention_sensitive and any(o.busy for o in self.instances if o is not inst)

    # -- disaggregation --------------------------------------------------------------------------------
    def _start_transfer(self, prefill: Instance, rid: str, num_prompt_tokens: int, now: float) -> None:
        flight = self._flights[rid]
        num_tokens = num_prompt_tokens - flight.num_cached_on_decode
        dt = self.overheads.kv_transfer_s(num_tokens)
        latency = 0.0
        if dt is None:  # the link model: each rank sends its shard in parallel; under ep a request's
            # KV lives on one card (one link)
            pools = (prefill.pool, flight.decode.pool)
            tp = 1 if any(p.parallelism == "ep" for p in pools) else min(p.tp for p in pools)
            dt = kv_transfer_s(num_tokens, self.model, prefill.hardware, tp, self._transfer_inter, self.spec.kv_dtype)
            latency = prefill.hardware.link_latency_s(self._transfer_inter) if num_tokens > 0 else 0.0
        start = max(now, prefill.link_free_s)
        prefill.link_free_s = start + dt - latency
        self.recorder.kv_bytes += num_tokens * self.model.kv_bytes_per_token(2.0 if self.spec.kv_dtype == "bf16" else 1.0)
        self._push(start + dt, _TRANSFER_DONE, rid)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _request(self, rid: str, slot: int, item: WorkItem, max_tokens: int) -> SimRequest:
        req = SimRequest(rid, item.index, item.input_len, max_tokens, 0.0, item.hash_ids, item.block_size)
        req.slot = slot
        return req

    def _complete(self, slot: int, now: float) -> None:
        self.recorder.finish(slot, now)
        if self.concurrency is not None:  # the client sees the end return_s later, then sends
            self._release_next(now + self.overheads.return_s)

    def _fail(self, slot: int, now: float, error: str) -> None:
        self.recorder.fail(slot, now, error)
        if self.concurrency is not None:
            self._release_next(now + self.overheads.return_s)

    def _release_next(self, send: float) -> None:
        """Closed loop: the next request leaves the client at ``send``."""
        if self._next_item < len(self.items):
            self.recorder.send_s[self._next_item] = send
            self._push(send + self.overheads.admission_s, _ARRIVAL, self._next_item)
            self._next_item += 1

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def _make_pool(self, name: str, pool: PoolSpec) -> list[Instance]:
        if pool.hardware not in self.catalogue:
            raise ValueError(f"unknown hardware {pool.hardware!r}; known: {', '.join(sorted(self.catalogue))}")
        hw = self.catalogue[pool.hardware]
        base = make_perf_model(self.options.perf_model, self.model, hw, pool.tp, self.spec.precision,
                               self.spec.kv_dtype, pool.parallelism)
        num_blocks = self.options.num_blocks or instance_kv_blocks(
            self.model, hw, pool.tp, self.spec.precision, self.spec.block_size, pool.max_num_batched_tokens,
            self.spec.kv_dtype, parallelism=pool.parallelism)
        role = {"colocated": "both"}.get(name, name)
        insts = [Instance(i, role, pool, hw, base, num_blocks, self.spec.block_size, self.spec.enable_prefix_caching,
                          self.max_model_len) for i in range(pool.instances)]
        for inst in insts:
            inst.step_overhead = base.overheads.step(role) if base.overheads is not None else None
            inst.noise = StepNoise(inst.step_overhead, f"{self.options.seed}/{role}/{inst.index}")
        return insts

    def _kv_link_is_inter(self) -> bool:
        spec = self.spec
        if spec.mode == "colocated" or spec.kv_link != "auto":
            return spec.kv_link == "inter"
        p, d = spec.prefill, spec.decode
        hw = self.catalogue[p.hardware]
        return p.hardware != d.hardware or p.tp + d.tp > hw.node_size

    def _result(self) -> dict:
        from pdserve.sim.results import cluster_section
        result = self.recorder.result(self.scale)
        result["workload"] = self.workload
        result["cluster"] = self.spec.to_dict()
        result["sim"] = cluster_section(self)
        return result


def make_perf_model(kind: str, model: ModelSpec, hardware: Hardware, tp: int, precision: str,
                    kv_dtype: str = "bf16", parallelism: str = "tp") -> PerfModel:
    """``analytic`` or the path of a calibrated model file."""
    if kind == "analytic":
        return AnalyticPerfModel(model, hardware, tp, precision, kv_dtype, parallelism)
    from pdserve.sim.calibrated import CalibratedPerfModel
    return CalibratedPerfModel.load(kind)


def _is_first_decode(chunk) -> bool:
    """Whether ``chunk`` is its request's first decode (one token right after the whole prompt)."""
    return chunk.num_tokens == 1 and chunk.start == chunk.request.num_prompt_tokens


def _sampling(spec: ClusterSpec, sample_instances: int | None):
    """(scale factor, pools to build, predicate on request index) for a representative slice."""
    pools = dict(spec.pools)
    if not sample_instances:
        return 1.0, pools, lambda i: True
    if spec.mode == "colocated":
        n = spec.colocated.instances
        k = max(1, min(n, sample_instances))
        pools["colocated"] = _with_instances(spec.colocated, k)
        return n / k, pools, lambda i: i % n < k
    np_, nd = spec.prefill.instances, spec.decode.instances
    g = math.gcd(np_, nd)
    unit = np_ // g + nd // g
    u = max(1, min(g, math.ceil(sample_instances / unit)))
    pools["prefill"] = _with_instances(spec.prefill, u * np_ // g)
    pools["decode"] = _with_instances(spec.decode, u * nd // g)
    return g / u, pools, lambda i: i % g < u


def _with_instances(pool: PoolSpec, n: int) -> PoolSpec:
    return replace(pool, instances=n)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="simulating", smoothing=0.1)

