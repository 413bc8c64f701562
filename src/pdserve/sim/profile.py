"""``pdserve profile``: time the real engine on a grid of batch shapes and fit a calibrated perf model.

``pdserve profile --live TRACE_DIR --bench RESULT.json --base perf-model.json`` instead adds the overheads
of a live deployment to a profiled model, fitted from a traced calibration run (``sim/live.py``).

Each measurement is one ``EngineCore.step()``; the batch it ran is captured from the scheduler's own
``SchedulerOutput`` (``BatchShape.from_chunks``), so the fit uses exactly the features the simulator
computes. The grid: single and batched prefills of several lengths, decode batches of several sizes
and context lengths (equal contexts, and one long context among short ones: attention that pads decodes to the
longest, as the PyTorch fallback does, shows there), and mixed steps (decodes plus a prefill chunk).
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time

from pdserve.progress import bar
from pdserve.sim.perf_model import BatchShape

logger = logging.getLogger(__name__)

PREFILL_LENS = (16, 64, 256, 512, 1024)
PREFILL_BATCH = (2, 4)
DECODE_BATCH = (1, 4, 16, 32)
DECODE_CTX = (64, 512)
DECODE_STEPS = 4
UNEVEN_BATCH = (4, 16)  # one context of DECODE_CTX[-1] tokens among DECODE_CTX[0]-token ones


def add_profile_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="engine model (name or path)")
    p.add_argument("--load-format", default="dummy", help="dummy (random weights) or auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--hardware-name", default="cpu-this-machine", help="label stored in the file")
    p.add_argument("--quick", action="store_true", help="a smaller grid (tests)")
    from pdserve.bench.cli import positive_int
    p.add_argument("--passes", type=positive_int, default=3,
                   help="run the grid this many times and keep each step's median (a noisy host's slow "
                        "spells then move one pass, not the profile)")
    p.add_argument("--out", default="perf-model.json")
    g = p.add_argument_group("live calibration (fit overheads from a traced run instead of profiling)")
    g.add_argument("--live", nargs="+", default=None, metavar="TRACE_DIR",
                   help="traces of a calibration run (`pdserve up --trace-dir TRACE_DIR`); several "
                        "directories pool calibration runs made on different clusters (pass all their --bench)")
    g.add_argument("--bench", nargs="+", default=[], metavar="RESULT.json",
                   help="the `pdserve bench --out` result(s) of that run")
    g.add_argument("--base", default=None, metavar="FILE", help="the profiled model to add the overheads to")
    from pdserve.runtime import add_cpu_args
    add_cpu_args(p)  # profile as a worker runs: `pdserve up` pins each worker to one core


def measure(engine, quick: bool = False, passes: int = 1) -> tuple[list[BatchShape], list[float]]:
    """Run the grid on ``engine`` (an EngineCore) ``passes`` times, one pass after another; return the
    measured shapes and step seconds, each step's the median over the passes (a slow spell of the host,
    seconds to a minute long here, then moves one pass of a point, not the point: a profile taken in one
    pass on this machine once timed its 16-256-token prefills 1.2-1.5x slower than its longer ones)."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    from pdserve.sampling_params import SamplingParams
    captured: list[BatchShape] = []
    schedule = engine.scheduler.schedule

    def capture():
        out = schedule()
        captured.append(BatchShape.from_chunks(out.chunks))
        return out
    engine.scheduler.schedule = capture
    shapes: list[BatchShape] = []
    times: list[float] = []
    counter = [0]

    def add(prompt_len: int, max_tokens: int) -> None:
        counter[0] += 1
        # Distinct first token per request: no prefix-cache hits between measurements.
        prompt = [100 + (counter[0] * 7919 + i * 31) % 20000 for i in range(prompt_len)]
        engine.add_request(f"p{counter[0]}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                      temperature=0.0))

    def step() -> None:
        captured.clear()
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if captured and captured[0].num_tokens:
            shapes.append(captured[0])
            times.append(dt)

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    lens = PREFILL_LENS[:3] if quick else PREFILL_LENS
    budget = engine.config.scheduler.max_num_batched_tokens
    add(32, 1)  # warm-up
    drain()

    def decode_batch(ctxs: list[int]) -> None:
        for ctx in ctxs:
            add(ctx, DECODE_STEPS + 2)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                engine.scheduler.waiting:
            engine.step()  # prefills
        for _ in range(DECODE_STEPS):
            step()
        # Mixed: a prefill chunk joins the decodes.
        add(min(256, budget // 2), 1)
        step()
        drain()

    prefill_points = [(n, batch) for n in lens for batch in (1, *(() if quick else PREFILL_BATCH))
                      if n * batch <= budget]
    decode_points = [[ctx] * b for ctx in (DECODE_CTX[:1] if quick else DECODE_CTX)
                     for b in (DECODE_BATCH[:3] if quick else DECODE_BATCH)]
    decode_points += [[DECODE_CTX[-1]] + [DECODE_CTX[0]] * (b - 1)
                      for b in (UNEVEN_BATCH[:1] if quick else UNEVEN_BATCH)]
    progress = bar(passes * (len(prefill_points) + len(decode_points)), "profiling", unit="shape")
    runs = []
    for _ in range(passes):
        shapes.clear()
        times.clear()
        for n, batch in prefill_points:
            for _ in range(batch):
                add(n, 1)
            step()
            drain()
            progress.update()
        for ctxs in decode_points:
            decode_batch(ctxs)
            progress.update()
        runs.append((list(shapes), list(times)))
    progress.close()
    engine.scheduler.schedule = schedule
    return median_of_passes(runs)


def median_of_passes(runs: list[tuple[list[BatchShape], list[float]]]) -> tuple[list[BatchShape], list[float]]:
    """Passes of one grid: each step's median time over the passes where every pass ran the same shapes in
    the same order (as it does: the grid and the scheduler are deterministic); else all steps pooled."""
    if all(shapes == runs[0][0] for shapes, _ in runs):
        return list(runs[0][0]), [statistics.median(ts) for ts in zip(*(times for _, times in runs), strict=True)]
    logger.warning("profile passes ran different batches; pooling their steps instead of taking medians")
    return [s for shapes, _ in runs for s in shapes], [t for _, times in runs for t in times]


def run_profile_command(args) -> int:
    if args.live:
        return _run_live(args)
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.sim.calibrated import fit
    try:
        from pdserve.runtime import apply_cpu_args, freeze_startup_objects, keep_freed_memory
        from pdserve.engine.core import EngineCore
        apply_cpu_args(args)
        keep_freed_memory()  # as a worker runs
        config = EngineConfig(model=ModelConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                                device=args.device),
                              cache=CacheConfig(kv_cache_memory_bytes=512 * 2**20),
                              scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64))
        engine = EngineCore(config)
        freeze_startup_objects()  # as a worker runs
    except (ImportError, ValueError, OSError) as e:
        print(f"pdserve profile: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    shapes, times = measure(engine, args.quick, args.passes)
    model, stats = fit(shapes, times)
    model.meta.update({"model": args.model, "hardware": args.hardware_name, "tp": 1, "device": str(engine.device),
                       "created_by": "pdserve profile",
                       "samples": [{"shape": s.__dict__, "time_s": t} for s, t in zip(shapes, times, strict=True)]})
    model.save(args.out)
    print(f"measured {len(times)} steps in {time.perf_counter() - t0:.1f} s; median step "
          f"{statistics.median(times) * 1e3:.1f} ms")
    print("coefficients: " + json.dumps(dict(zip(("constant_s", "per_prefill_token_s", "per_prefill_attn_s",
                                                   "per_decode_s", "per_decode_ctx_s", "per_padded_decode_ctx_s"),
                                                  model.coef, strict=True))))
    print(f"fit: R^2 {stats['r2']:.3f}, mean abs. relative error {stats['mape']:.1%} over {stats['num_samples']} "
          f"steps, decodes free up to {stats['decode_knee']} a step; wrote {args.out}")
    return 0


def _run_live(args) -> int:
    from pdserve.sim.calibrated import CalibratedPerfModel
    from pdserve.sim.live import fit_live, format_fit, load_bench_results
    try:
        if not args.bench or not args.base:
            raise ValueError("--live needs --bench RESULT.json (the calibration run) and --base FILE (a profile)")
        base = CalibratedPerfModel.load(args.base)
        fitted = fit_live(args.live, load_bench_results(args.bench), base)
    except (ValueError, OSError, KeyError) as e:
        print(f"pdserve profile: error: {e}", file=sys.stderr)
        return 2
    model = base.with_overheads(fitted.overheads, {"live": {"trace_dir": ", ".join(args.live), "bench": list(args.bench),
                                                              "stats": fitted.stats}})
    model.save(args.out)
    print(format_fit(fitted))
    print(f"wrote {args.out}")
    return 0
