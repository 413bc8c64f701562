"""The discrete-event cluster simulator: pdserve's own frontend flow, router, schedulers and KV managers, with
modelled step times in place of the model.

Each instance (``sim/instance.py``, built by ``sim/pools.py``) is an ``engine.scheduler.Scheduler`` over a
``KVCacheManager`` sized from memory. An event loop replaces the model's execution: a step scheduled at time
t ends at t + ``StepTime.step_s`` (``sim/step_time.py``), and the scheduler is updated with dummy sampled
tokens (requests end by their max_tokens). The hand-off is the live one, run unchanged: ``flow.frontend``
admits and routes every request (``Router.route``, so ``min_remote_prefill_tokens`` and admission bounds
apply), each instance runs ``flow.decode.DecodeSide`` and ``flow.prefill.PrefillSide``, and this module
carries out their actions as events: a decode instance's reservation leaves when its step ends, reaches
the prefill instance through the frontend (``reservation_s`` later), the KV moves once the prompt is
computed and the reservation is there (serialised per prefill instance: the link model, or the copy time
of a live calibration), then the prefill side releases its blocks and the decode side joins the request
to its batch with the first token. Workers read messages between steps, so a message that reaches a busy
instance waits for its step to end.

Two speed-ups, both measured against the plain mode (docs/sim.md):

- fast-forward (exact): when an instance only decodes and nothing waits, the next k steps are known; it
  commits them at once through the scheduler (``commit_decode_steps``: same KV use, same step times, same
  token times) and is interrupted at the first step boundary after any event that concerns it;
- sampling (approximate): ``sample_instances`` simulates a representative slice of a large cluster (the
  same per-instance load: request i goes to the slice when i mod groups < slice), and scales throughputs
  back up.

(Over 400 lines: the event loop and its handlers share one state, the event queue and the instances';
split, one flow would be read across files.)
"""
from __future__ import annotations

import heapq
import logging
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.scheduler import SchedulerOutput
from pdserve.control.attainment import Attainment, Objectives, Sample
from pdserve.control.controller import ChangeRole, ElasticController, SetStepTarget, Signals, WorkerState
from pdserve.errors import PdserveError
from pdserve.flow import decode as fd
from pdserve.flow import frontend as ff
from pdserve.flow import prefill as fp
from pdserve.flow.frontend import FrontendFlow
from pdserve.kv.base import LoadDone, SaveDone
from pdserve.router.admission import Admission
from pdserve.router.path import PathChooser
from pdserve.router.policies import DecodePolicy, make_policy
from pdserve.router.router import Router
from pdserve.sim.cluster import ClusterSpec
from pdserve.sim.hardware import load_catalogue
from pdserve.sim.instance import Instance, SimTracker, WorkItem
from pdserve.sim.models import ModelSpec, get_model
from pdserve.sim.overheads import Overheads
from pdserve.sim.perf_model import BatchShape, kv_transfer_s
from pdserve.sim.pools import kv_link_is_inter, make_instances, sample_pools
from pdserve.sim.requests import DUMMY_TOKEN_ID, SimRequest
from pdserve.sim.results import Recorder
from pdserve.sim.store import SimStore, make_store

logger = logging.getLogger(__name__)

_ARRIVAL, _STEP_END, _WINDOW_END, _RESUME, _TRANSFER_DONE, _MESSAGE, _TICK, _STORE_LOADED, _STORE_SAVED = range(9)


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
    elastic_tick_s: float = 2.0  # auto mode: how often the elastic controller looks
    elastic_cooldown_s: float = 15.0  # ... and how long it waits between two decisions
    attainment_window_s: float = 30.0


class Simulator:
    """Runs ``items`` through the cluster ``spec``; ``run()`` returns the result dict (bench JSON shape)."""

    def __init__(self, spec: ClusterSpec, items: Sequence[WorkItem], options: SimOptions | None = None,
                 concurrency: int | None = None, slo: tuple[float | None, float | None] = (None, None),
                 workload: dict | None = None) -> None:
        self.spec, self.options = spec, options or SimOptions()
        self.model: ModelSpec = get_model(spec.model)
        self.catalogue = load_catalogue(self.options.hardware_file)
        self.max_model_len = self.model.max_context
        self.scale, pools, keep = sample_pools(spec, self.options.sample_instances)
        self.items = [it for it in items if keep(it.index)]
        self.concurrency = None if concurrency is None else max(1, math.ceil(concurrency / self.scale))
        self.pools: dict[str, list[Instance]] = {
            name: make_instances(name, pool, spec, self.model, self.catalogue, self.options.perf_model,
                                 self.options.num_blocks, self.options.seed)
            for name, pool in pools.items()}
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self.store: SimStore | None = make_store(spec, self.model, self.instances)  # None: no KV store
        decode_policy = DecodePolicy() if spec.decode_routing == "least_loaded" else make_policy(spec.decode_routing)
        self.objectives = Objectives(*slo)
        is_auto = spec.mode == "auto"
        # auto: the live frontend's path choice and elastic controller, run as they are
        self.router = Router(SimTracker(self.instances), make_policy(spec.routing), decode_policy,
                             spec.min_remote_prefill_tokens, PathChooser() if is_auto else None)
        self.attainment = Attainment(self.objectives, self.options.attainment_window_s)
        self.controller = ElasticController(self.objectives, cooldown_s=self.options.elastic_cooldown_s) \
            if is_auto else None
        self.path_counts = {"remote": 0, "local": 0}  # auto: where the path choice sent each prompt
        # The frontend's hand-off as the live frontend runs it (routing, admission, reservations).
        self.flow = FrontendFlow(self.router, Admission(spec.max_inflight or 1 << 62,
                                                        spec.max_inflight_per_instance or 1 << 62))
        self.recorder = Recorder(len(self.items), slo)
        self.workload = workload or {}
        self._events: list = []
        self._seq = 0
        self._next_item = 0
        self._transfer_inter = kv_link_is_inter(spec, self.catalogue)
        self.overheads: Overheads = self.instances[0].perf.overheads or Overheads()
        self.recorder.return_s = self.overheads.return_s
        # Contention between the instances of one host makes a step's time depend on the others (such
        # simulations are one host's few instances anyway); jittered steps are drawn one by one.
        self._is_contention_sensitive = len(self.instances) > 1 and any(
            i.step_time.is_contention_sensitive for i in self.instances)
        self._fast_forward = self.options.fast_forward and all(i.step_time.can_fast_forward for i in self.instances)

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
                    self._on_message, self._on_tick, self._on_store_loaded, self._on_store_saved)
        if self.controller is not None:
            initial = self.controller.initial(self._worker_states())
            self.controller.record(0.0, initial)
            self._apply(initial, 0.0)
            self._push(self.options.elastic_tick_s, _TICK, None)
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
        """The request reaches the frontend and its workers (its send time, ``admission_s`` earlier, is
        recorded)."""
        item = self.items[slot]
        self.recorder.send(slot, self.recorder.send_s[slot], item.input_len, item.output_len)
        if item.input_len >= self.max_model_len:
            self._fail(slot, now, "prompt longer than the context length")
            return
        if not self._fits(item):
            self._fail(slot, now, "does not fit the KV cache")
            return
        rid = str(slot)
        req = self._request(rid, slot, item, item.output_len)
        try:
            actions = self.flow.submit(rid, item.input_len, req.update_block_hashes(self.spec.block_size),
                                       self.spec.block_size)
        except PdserveError as e:  # admission: the live frontend answers 429 (or 503 without workers)
            self._fail(slot, now, f"{e.http_status}: {e}")
            return
        if self.controller is not None:
            self.path_counts["remote" if self.flow.requests[rid].prefill_id else "local"] += 1
        woken = []
        for a in actions:
            assert isinstance(a, ff.AddToWorker), a
            inst = self.by_id[a.worker_id]
            if a.hold_kv:  # the prefill worker computes the prompt and samples its first token only
                inst.add(self._request(rid, slot, item, 1), hold_kv=True)
            else:
                inst.add(req, remote_kv=a.remote_kv)
            woken.append(inst)
        for inst in woken:
            self._wake(inst, now)

    def _on_step_end(self, now: float, payload: tuple[Instance, SchedulerOutput]) -> None:
        inst, out = payload
        sampled = {c.request.request_id: DUMMY_TOKEN_ID for c in out.chunks if c.samples}
        outputs = inst.scheduler.update_from_output(out, sampled)
        held = [o for o in outputs if o.request_id in inst.prefill_side]
        for o in held:  # max_tokens=1: every output finishes, its KV held for the send
            self._execute_prefill(inst, inst.prefill_side.computed(o.request_id, o.kv_block_ids or [], DUMMY_TOKEN_ID,
                                                                   None, o.num_cached_tokens, now), now)
        if len(held) < len(outputs):
            self._record_tokens(inst, [o for o in outputs if o.request_id not in inst.prefill_side] if held
                                else outputs, now)
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
                self.flow.on_output(inst.instance_id, o.request_id, 0, True)
                self._complete(slot, now)
        if num_continuing:
            rec.add_itl(now - step_start, num_continuing)

    def _boundary(self, inst: Instance, now: float) -> None:
        """Between two steps, as a worker's loop: send what the step produced (reservations), read the
        messages that arrived during it, then start the next step."""
        if inst.outbox:  # reservations, through the frontend to the prefill instances
            delay = self.overheads.reservation_s
            for reservation in inst.outbox:
                for a in self.flow.on_reservation(inst.instance_id, reservation.request_id, reservation):
                    assert isinstance(a, ff.Forward), a
                    self._push(now + delay, _MESSAGE, (self.by_id[a.worker_id], "reservation", a.reservation))
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

    def _on_transfer_done(self, now: float, payload: tuple[Instance, Instance, str]) -> None:
        prefill, decode, rid = payload
        self._execute_prefill(prefill, prefill.prefill_side.saved(SaveDone(rid, True)), now)
        if prefill.scheduler.has_unfinished_requests():  # freed blocks may admit waiting prompts
            self._wake(prefill, now)
        self._deliver(decode, now, "kv", rid)

    def _on_message(self, now: float, payload: tuple[Instance, str, object]) -> None:
        inst, kind, body = payload
        self._deliver(inst, now, kind, body)

    def _deliver(self, inst: Instance, now: float, kind: str, body: object) -> None:
        """A message reaches ``inst``: read now if it is idle, else when its step ends."""
        if inst.busy:
            inst.inbox.append((kind, body))
            if inst.window is not None:
                self._wake(inst, now)  # cut the fast-forward window at the next step boundary
            return
        self._handle(inst, now, kind, body)
        self._wake(inst, now)

    def _handle(self, inst: Instance, now: float, kind: str, body) -> None:
        if kind == "reservation":  # at the prefill instance
            self._execute_prefill(inst, inst.prefill_side.reservation(body), now)
            return
        if kind == "store_loaded":  # the prefill continues after the loaded tokens
            rid, num_tokens = body
            inst.scheduler.finish_load(rid, num_loaded_tokens=num_tokens)
            return
        if kind == "store_saved":
            inst.release_kv(body, "store")
            return
        assert kind == "kv", kind  # at the decode instance: the request joins its batch, first token out
        for a in inst.decode_side.loaded(LoadDone(body, True, DUMMY_TOKEN_ID)):
            assert isinstance(a, fd.JoinBatch), a
            out = inst.scheduler.finish_load(a.request_id, a.first_token_id)
            assert out is not None, a.request_id
            slot = int(a.request_id)
            self.recorder.first_token(slot, now, out.num_cached_tokens)
            if out.finished:
                self.flow.on_output(inst.instance_id, a.request_id, 0, True)
                self._complete(slot, now)

    def _execute_prefill(self, inst: Instance, actions: list, now: float) -> None:
        for a in actions:
            if isinstance(a, fp.StartSave):
                self._start_transfer(inst, a, now)
            elif isinstance(a, fp.ReleaseBlocks):
                inst.release_kv(a.request_id)
            elif isinstance(a, fp.ReportDone):
                assert a.ok, a
                self.flow.on_prefill_done(a.request_id, a.ok)
            else:
                raise AssertionError(f"unexpected action in a simulation without failures: {a}")

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
        if inst.store_side is not None:
            self._start_saves(inst, now)
        if self._fast_forward and inst.role != "prefill" and self._try_window(inst, now):
            return
        out = inst.scheduler.schedule()
        if inst.store_side is not None:
            self._start_loads(inst, now)
        for res in out.reservations:  # sent after the step (at once if there is no step)
            if res.request_id not in inst.decode_side:
                continue  # a store load's (``_start_loads``)
            for a in inst.decode_side.reserved(res, inst.kv_target, now):
                assert isinstance(a, fd.SendReservation), a
                inst.outbox.append(a.reservation)
        if out.is_empty:
            if inst.outbox:
                self._boundary(inst, now)
            return
        shape = BatchShape.from_chunks(out.chunks)
        dt = inst.step_time.step_s(shape, out.chunks, now, inst.idle_since, self._is_contended(inst))
        inst.busy = True
        inst.step_start = now
        inst.num_steps += 1
        inst.busy_s += dt
        if shape.num_prefill_tokens:
            inst.prefill_busy_s += dt * inst.step_time.prefill_share(shape)
            for c in out.chunks:  # prompt tokens computed (not cached, not loaded), recomputes included
                n = c.request.num_prompt_tokens
                if c.start < n:
                    inst.prompt_tokens_computed += min(c.start + c.num_tokens, n) - c.start
        self._push(now + dt, _STEP_END, (inst, out))

    def _try_window(self, inst: Instance, now: float) -> bool:
        """Fast-forward k >= 2 pure-decode steps if nothing waits and no request can finish inside."""
        s = inst.scheduler
        if s.waiting or not s.running or len(s.running) > s.config.max_num_batched_tokens:
            return False
        running = s.running
        k = inst.window_limit  # adaptive: doubles after a full window, shrinks after a cut one
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
        bs = inst.block_size
        free = inst.kv.pool.num_free_blocks
        while k >= 2 and sum(-(-(r.num_computed_tokens + k) // bs) - -(-r.num_computed_tokens // bs)
                             for r in running) > free:
            k //= 2
        if k < 2:
            return False
        ends = inst.step_time.decode_steps_s(running, k, now, inst.idle_since)
        if ends is None:
            return False
        t = ends[-1]
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
        inst.scheduler.commit_decode_steps(reqs, j, DUMMY_TOKEN_ID)
        rec = self.recorder
        last_s, num_tokens = rec.last_s, rec.num_tokens
        num_continuing = 0
        for r in reqs:
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

    # -- the KV store (sim/store.py) --------------------------------------------------------------------
    def _start_loads(self, inst: Instance, now: float) -> None:
        """The loads the scheduler asked for: each takes its blocks' bytes over the tiers' links, one load
        after the other on the instance; the request waits for its own load only."""
        store = self.store
        for load in inst.store_side.take_loads():
            n, per_tier = store.load(inst.host, load.block_hashes)
            start = max(now, inst.load_free_s)
            inst.load_free_s = start + inst.store_seconds(per_tier)
            store.loaded_tokens += n * inst.block_size
            self._push(inst.load_free_s, _STORE_LOADED, (inst, load.request_id, n * inst.block_size))

    def _start_saves(self, inst: Instance, now: float) -> None:
        """Finished requests' blocks to every tier; they are held until the save ends, then released."""
        store = self.store
        for save in inst.store_side.take_saves():
            nbytes = len(save.block_hashes) * store.block_bytes
            inst.save_queued_bytes += nbytes
            start = max(now, inst.save_free_s)
            inst.save_free_s = start + inst.store_seconds(store.missing(inst.host, save.block_hashes))
            self._push(inst.save_free_s, _STORE_SAVED, (inst, save.request_id, save.block_hashes, nbytes))

    def _on_store_loaded(self, now: float, payload: tuple[Instance, str, int]) -> None:
        inst, rid, num_tokens = payload
        self._deliver(inst, now, "store_loaded", (rid, num_tokens))

    def _on_store_saved(self, now: float, payload: tuple[Instance, str, list[int], int]) -> None:
        inst, rid, hashes, nbytes = payload
        self.store.save(inst.host, hashes)
        inst.save_queued_bytes -= nbytes
        self._deliver(inst, now, "store_saved", rid)

    # -- the elastic controller (auto mode) -------------------------------------------------------------
    def _on_tick(self, now: float, payload: None) -> None:
        views = [i for i in self.instances if not i.is_parked]
        wait = min((i.queued_prefill_tokens * i.prefill_token_s for i in views), default=0.0)
        signals = Signals(now, self.attainment.window(now), wait)
        self._apply(self.controller.tick(signals, self._worker_states()), now)
        if self._events:  # the controller looks while anything else is still to happen
            self._push(now + self.options.elastic_tick_s, _TICK, None)

    def _worker_states(self) -> list[WorkerState]:
        """Instances as the controller sees them: not pinned to cores (cards do not move; roles and time do)."""
        return [WorkerState(i.instance_id, "prefill" if i.role == "prefill" else "decode", i.instance_id, None,
                            i.step_target_s, i.decode_step_s) for i in self.instances]

    def _apply(self, decisions: list, now: float) -> None:
        for d in decisions:
            if isinstance(d, ChangeRole):
                inst = self.by_id[d.worker_id]
                inst.role = d.role  # its running requests finish where they are; routing follows the role
                self._wake(inst, now)
            elif isinstance(d, SetStepTarget):
                self.by_id[d.worker_id].set_step_target(d.step_target_s)

    def _is_contended(self, inst: Instance) -> bool:
        """Whether another instance of the host is in a step (only asked of calibrated live models)."""
        return self._is_contention_sensitive and any(o.busy for o in self.instances if o is not inst)

    # -- disaggregation --------------------------------------------------------------------------------
    def _start_transfer(self, prefill: Instance, save: fp.StartSave, now: float) -> None:
        rid = save.request_id
        decode = self.by_id[save.reservation.target.worker_id]
        num_tokens = self.items[int(rid)].input_len - save.reservation.num_cached_tokens
        dt = self.overheads.kv_transfer_s(num_tokens)
        latency = 0.0
        if dt is None:  # the link model: each rank sends its shard in parallel; under ep a request's
            # KV lives on one card (one link)
            pools = (prefill.pool, decode.pool)
            tp = 1 if any(p.parallelism == "ep" for p in pools) else min(p.tp for p in pools)
            dt = kv_transfer_s(num_tokens, self.model, prefill.hardware, tp, self._transfer_inter, self.spec.kv_dtype)
            latency = prefill.hardware.link_latency_s(self._transfer_inter) if num_tokens > 0 else 0.0
        start = max(now, prefill.link_free_s)
        prefill.link_free_s = start + dt - latency
        self.recorder.kv_bytes += num_tokens * self.model.kv_bytes_per_token(2.0 if self.spec.kv_dtype == "bf16" else 1.0)
        self._push(start + dt, _TRANSFER_DONE, (prefill, decode, rid))

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _request(self, rid: str, slot: int, item: WorkItem, max_tokens: int) -> SimRequest:
        req = SimRequest(rid, item.index, item.input_len, max_tokens, 0.0, item.hash_ids, item.block_size,
                         item.hashed_tokens)
        req.slot = slot
        return req

    def _fits(self, item: WorkItem) -> bool:
        """Whether every pool's instances can hold the request (a prefill instance: its prompt and one token)."""
        for name, pool in self.pools.items():
            kv = pool[0].kv
            if kv.num_blocks_for(item.input_len + (1 if name == "prefill" else item.output_len)) > kv.num_blocks:
                return False
        return True

    def _complete(self, slot: int, now: float) -> None:
        self.recorder.finish(slot, now)
        if self.controller is not None:
            rec = self.recorder
            n = rec.num_tokens[slot]
            tpot = (now - rec.first_s[slot]) / (n - 1) if n > 1 else None
            self.attainment.record(Sample(now, rec.first_s[slot] - rec.send_s[slot], tpot, 0.0))
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

    def _result(self) -> dict:
        from pdserve.sim.results import cluster_section
        result = self.recorder.result(self.scale)
        result["workload"] = self.workload
        result["cluster"] = self.spec.to_dict()
        result["sim"] = cluster_section(self)
        return result


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="simulating", smoothing=0.1)

