"""The elastic controller on the live cluster: reads the frontend's signals, carries out its decisions.

Every ``tick_s`` the loop hands ``control.controller.ElasticController`` the SLO attainment of the last
window (recorded by the frontend client as requests finish), the predicted wait of a new prompt, and the
workers as their latest ``WorkerInfo``/``Stats`` describe them; each decision becomes ``Configure``
messages (a core move: the giving worker first, then the receiving one) and takes effect in routing at
once (the router's views follow the new roles and cores). Every decision is logged with its reason and kept
(bounded) for ``/v1/cluster``.
"""
from __future__ import annotations

import asyncio
import logging
import time

from pdserve import protocol as p
from pdserve.control import controller as ctl
from pdserve.control.controller import ElasticController, Signals, WorkerState

logger = logging.getLogger(__name__)

INITIAL_LAYOUTS = ("split", "colocated")  # as the launcher started the workers, or every host's cores to decode


class ElasticLoop:
    def __init__(self, client, controller: ElasticController, tick_s: float = 2.0,
                 initial_layout: str = "split") -> None:
        if initial_layout not in INITIAL_LAYOUTS:
            raise ValueError(f"initial layout must be one of {INITIAL_LAYOUTS}, got {initial_layout!r}")
        self.client = client
        self.controller = controller
        self.tick_s = tick_s
        self.initial_layout = initial_layout

    async def run(self) -> None:
        workers = self.workers()
        first = ctl.colocate(workers) if self.initial_layout == "colocated" else []
        first += self.controller.initial(ctl.apply(workers, first))
        self.controller.record(time.monotonic(), first)
        self._carry_out(first)
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def tick(self) -> list[ctl.Decision]:
        now = time.monotonic()
        signals = Signals(now, self.client.attainment.window(now), self.prefill_wait_s())
        decisions = self.controller.tick(signals, self.workers())
        self._carry_out(decisions)
        return decisions

    def workers(self) -> list[WorkerState]:
        """The live workers as the controller sees them (a colocated ``both`` worker counts as decode)."""
        out = []
        for wid, conn in sorted(self.client.conns.items()):
            if not conn.is_alive or conn.info is None:
                continue
            info, s = conn.info, conn.stats
            role = s.role if s is not None else info.role
            cpus = s.cpus if s is not None and s.cpus is not None else info.cpus
            target = s.step_target_s if s is not None else info.step_target_s
            out.append(WorkerState(wid, "prefill" if role == "prefill" else "decode", info.host,
                                   None if cpus is None else tuple(cpus), target,
                                   s.decode_step_s if s is not None else 0.0))
        return out

    def prefill_wait_s(self) -> float:
        """The predicted queueing before a new prompt's prefill starts, on the best place to run it."""
        waits = [v.queued_prefill_tokens * v.prefill_token_s for v in self.client.tracker.instances.values()
                 if v.is_alive and not v.is_parked and v.prefill_token_s > 0]
        return min(waits, default=0.0)

    def status(self) -> dict:
        """For ``/v1/cluster``: objectives, the last window's attainment, recent decisions with reasons."""
        c, now = self.controller, time.monotonic()
        a = self.client.attainment.window(now)
        offset = time.time() - now
        return {
            "objectives": {"ttft_s": c.objectives.ttft_s, "tpot_s": c.objectives.tpot_s,
                           "itl_p99_s": c.objectives.itl_p99_s, "target": c.objectives.target},
            "window": {"num_requests": a.num_requests, "ttft_attainment": a.ttft, "tpot_attainment": a.tpot,
                       "slo_attainment": a.both, "itl_p99_s": a.itl_p99_s},
            "starving": c.starving(Signals(now, a, self.prefill_wait_s())),
            "decisions": [{"unix_s": round(t + offset, 3), "kind": type(d).__name__, "reason": d.reason}
                          for t, d in c.history[-50:]],
            # moves undone soon after they were made, not made again until then (control/controller.py)
            "held": [{"move": " ".join(m), "until_unix_s": round(until + offset, 3)} for m, until in c.held().items()],
        }

    def _carry_out(self, decisions: list[ctl.Decision]) -> None:
        carry_out(self.client, decisions)


def carry_out(client, decisions: list[ctl.Decision]) -> None:
    """Send each decision's ``Configure`` messages and make routing follow it at once."""
    tracker = client.tracker
    for d in decisions:
        logger.info("elastic: %s", d.reason)
        if isinstance(d, ctl.MoveCores):
            client.configure(d.src, p.Configure(cpus=list(d.src_cores)))
            client.configure(d.dst, p.Configure(cpus=list(d.dst_cores)))
            for wid, cores in ((d.src, d.src_cores), (d.dst, d.dst_cores)):
                if wid in tracker.instances:
                    tracker.instances[wid].cores = tuple(cores)
        elif isinstance(d, ctl.ChangeRole):
            client.configure(d.worker_id, p.Configure(role=d.role))
            if d.worker_id in tracker.instances:
                tracker.instances[d.worker_id].role = d.role
        elif isinstance(d, ctl.SetStepTarget):
            client.configure(d.worker_id, p.Configure(set_step_target=True, step_target_s=d.step_target_s))
            if d.worker_id in tracker.instances:
                tracker.instances[d.worker_id].step_target_s = d.step_target_s
        if client.metrics is not None:
            client.metrics.observe_decision(type(d).__name__)


def decision_from_json(body: dict) -> ctl.Decision:
    """An operator's (or a test's) decision, as ``POST /debug/elastic`` takes it; ValueError when malformed."""
    kinds = {"MoveCores": ctl.MoveCores, "ChangeRole": ctl.ChangeRole, "SetStepTarget": ctl.SetStepTarget}
    kind = kinds.get(body.get("kind", ""))
    if kind is None:
        raise ValueError(f"kind must be one of {sorted(kinds)}")
    fields = {k: v for k, v in body.items() if k != "kind"}
    fields.setdefault("reason", "operator")
    try:
        if kind is ctl.MoveCores:
            fields["src_cores"], fields["dst_cores"] = tuple(fields["src_cores"]), tuple(fields["dst_cores"])
        return kind(**fields)
    except (TypeError, KeyError) as e:
        raise ValueError(f"bad {kind.__name__}: {e}") from e
