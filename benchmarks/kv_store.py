"""The KV store: load and save bandwidth per tier against memcpy, and multi-turn replays across two workers.

``bandwidth``: the blocks of a prompt (scattered cache block ids, as a fragmented pool gives them) saved to and
loaded back from each tier through ``TieredStore`` (kv/store/tiers.py: host pool in /dev/shm, disk files, Valkey
over the Redis protocol, Mooncake's store over TCP; the servers started here), timed per operation, as a ratio
to a plain copy of the same bytes (``dst.copy_(src)``, one contiguous tensor) measured in the same run. Medians
of --repeats. Each load checks every block's checksum; each save skips blocks the tier holds, so saves are timed
on fresh hashes.

``replay``: ``pdserve up --colocated 2 --routing round_robin`` (so reuse must cross workers), store off vs each
tier, sequential requests (TTFT is the prompt's cost, not queueing): the first --trace-requests of the Mooncake
trace (lengths scaled by --length-scale; its hash ids give the tokens a request could reuse: its leading hash
ids seen in an earlier request) and the bench's own multi-turn conversations (bench/workloads.py
``multi_turn``: each turn is the previous turns, their answers and a new message). Reported: prefix hit rate
(cached prompt tokens / reusable tokens), prompt tokens computed, TTFT p50 and p90.

    flock -x /tmp/pdserve-cpu.lock .venv/bin/python benchmarks/kv_store.py bandwidth
    flock -x /tmp/pdserve-cpu.lock .venv/bin/python benchmarks/kv_store.py replay --tiers off,host,remote
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"smollm2": (30, 3, 64, torch.float32), "llama8b": (32, 8, 128, torch.bfloat16)}
BLOCK = 16
TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces" / "mooncake_synthetic.jsonl"


# -- bandwidth -----------------------------------------------------------------------------------------------
def bandwidth(args) -> list[dict]:
    from pdserve.cluster.store_server import StoreServer
    from pdserve.config import KVStoreConfig
    from pdserve.kv.store.keys import Namespace
    from pdserve.kv.store.tiers import TieredStore

    torch.set_num_threads(args.threads)
    layers, heads, dim, dtype = SHAPES[args.shape]
    itemsize = torch.empty((), dtype=dtype).element_size()
    ns = Namespace(f"bench-{random.getrandbits(32)}", str(dtype).removeprefix("torch."), (layers, 2, BLOCK, heads, dim),
                   itemsize)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-kvbench-"))
    for tokens in [int(t) for t in args.tokens.split(",")]:
        n = tokens // BLOCK
        num_blocks = 4 * n
        cache = torch.randn((layers, 2, num_blocks, BLOCK, heads, dim)).to(dtype)
        dst = torch.zeros_like(cache)
        ids = random.Random(0).sample(range(num_blocks), n)
        out_ids = random.Random(1).sample(range(num_blocks), n)
        nbytes = n * ns.block_bytes
        flat_src, flat_dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
        memcpy = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            flat_dst.copy_(flat_src)
            memcpy.append(time.perf_counter() - t0)
        base = statistics.median(memcpy)
        for tier in args.tiers.split(","):
            server = None
            if tier in ("redis", "mooncake"):
                server = StoreServer(tier, "127.0.0.1", max(256 * 2**20, 4 * nbytes * (args.repeats + 1)),
                                     tmp)
                config = KVStoreConfig(remote=server.start(), timeout_s=10.0)
            elif tier == "host":
                config = KVStoreConfig(host_memory_bytes=4 * nbytes * (args.repeats + 1))
            else:
                config = KVStoreConfig(disk=f"{tmp}/disk:{8 * nbytes * (args.repeats + 1)}")
            store = TieredStore(config, ns)
            try:
                saves, loads = [], []
                for r in range(args.repeats + 1):
                    hashes = [random.getrandbits(63) for _ in range(n)]
                    t0 = time.perf_counter()
                    store.save(hashes, cache, ids)
                    t1 = time.perf_counter()
                    got = store.load(hashes, dst, out_ids)
                    t2 = time.perf_counter()
                    assert got == n, (tier, got, n)
                    if r:  # the first touches every page
                        saves.append(t1 - t0)
                        loads.append(t2 - t1)
                assert all(torch.equal(dst[:, :, o], cache[:, :, i]) for o, i in zip(out_ids, ids))
            finally:
                store.close()
                if server is not None:
                    server.stop()
            save_s, load_s = statistics.median(saves), statistics.median(loads)
            row = {"tier": tier, "tokens": tokens, "mib": round(nbytes / 2**20, 1), "memcpy_gbs": nbytes / base / 1e9,
                   "load_gbs": nbytes / load_s / 1e9, "save_gbs": nbytes / save_s / 1e9,
                   "load_vs_memcpy": base / load_s, "save_vs_memcpy": base / save_s, "load_ms": load_s * 1e3}
            rows.append(row)
            print(f"{tier:9s} {tokens:6d} tok {row['mib']:7.1f} MiB  memcpy {row['memcpy_gbs']:6.2f} GB/s  "
                  f"load {row['load_gbs']:6.2f} GB/s ({row['load_vs_memcpy']:.2f}x)  save {row['save_gbs']:6.2f} GB/s "
                  f"({row['save_vs_memcpy']:.2f}x)", flush=True)
    return rows


# -- replay --------------------------------------------------------------------------------------------------
def _trace_requests(args) -> list[dict]:
    """The first requests of the Mooncake trace as prompts, with their reusable tokens from the hash ids."""
    from pdserve.bench.workloads import PromptBuilder, WorkloadConfig, build_shapes

    config = WorkloadConfig(dataset="mooncake", trace_path=str(TRACE), num_requests=args.trace_requests,
                            length_scale=args.length_scale, output_length_scale=1.0 / 64, seed=0)
    shapes = build_shapes(config)[:args.trace_requests]
    builder = PromptBuilder(config)
    seen: set[int] = set()
    out = []
    for s in shapes:
        reusable = 0
        for h in s.hash_ids:
            if h not in seen:
                break
            reusable += s.block_size
        seen.update(s.hash_ids)
        ids = builder.prompt_token_ids(s)
        out.append({"ids": ids, "max_tokens": max(1, min(s.output_len, 8)),
                    "reusable": min(reusable, (len(ids) - 1) // BLOCK * BLOCK)})
    return out


def _run_cluster(flags: list[str], trace: list[dict], conversations, args) -> dict:
    import httpx
    import openai

    from pdserve.cluster.local import free_port, wait_healthy

    port = free_port()
    log = open(f"/tmp/pdserve-kvbench-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--colocated", "2",
                             "--routing", "round_robin", "--kv-cache-memory", args.kv_cache, "--dtype", "float32",
                             *flags], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=600, max_retries=0)

        def ask(ids, max_tokens):
            t0 = time.perf_counter()
            ttft, text_ids, usage = None, [], None
            for chunk in c.completions.create(model="smollm2-135m", prompt=ids, max_tokens=max_tokens, temperature=0,
                                              stream=True, stream_options={"include_usage": True}, logprobs=0,
                                              extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True}):
                if chunk.choices and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.choices and chunk.choices[0].logprobs:
                    text_ids += [int(t.removeprefix("token_id:")) for t in chunk.choices[0].logprobs.tokens]
                if chunk.usage is not None:
                    usage = chunk.usage
            return ttft, text_ids, usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0

        results = {}
        for name, items in (("trace", trace), ("multi_turn", None))[0 if trace else 1:]:
            ttfts, cached, reusable, prompt = [], 0, 0, 0
            if name == "trace":
                for r in items:
                    ttft, _, hit = ask(r["ids"], r["max_tokens"])
                    ttfts.append(ttft)
                    cached += hit
                    reusable += r["reusable"]
                    prompt += len(r["ids"])
                    time.sleep(args.gap_s)
            else:
                histories = [list(conv[0]) for conv in conversations]
                for turn in range(len(conversations[0])):
                    for i, conv in enumerate(conversations):
                        if turn:
                            histories[i] += conv[turn]
                        ids = histories[i]
                        ttft, out, hit = ask(ids, args.turn_output)
                        ttfts.append(ttft)
                        cached += hit
                        if turn:
                            reusable += (len(ids) - len(conv[turn]) - 1) // BLOCK * BLOCK
                        prompt += len(ids)
                        histories[i] = ids + out
                        time.sleep(args.gap_s)
            ttfts.sort()
            results[name] = {"requests": len(ttfts), "prompt_tokens": prompt, "computed_tokens": prompt - cached,
                             "cached_tokens": cached, "reusable_tokens": reusable,
                             "hit_rate_of_reusable": cached / reusable if reusable else None,
                             "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))]}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        results["store_metrics"] = [line for line in metrics.splitlines()
                                    if line.startswith(("pdserve:kv_store_hits_total", "pdserve:kv_store_errors_total",
                                                        "pdserve:kv_store_save_drops_total"))]
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def replay(args) -> dict:
    from pdserve.bench.workloads import multi_turn_conversations

    trace = _trace_requests(args) if args.trace_requests > 0 else []
    conversations = multi_turn_conversations(args.conversations, args.turns, args.first_len, args.turn_len, seed=0)
    tier_flags = {"off": [], "host": ["--kv-host-memory", args.host_memory],
                  "disk": ["--kv-disk", f"{tempfile.mkdtemp(prefix='pdserve-kvdisk-')}:4GiB"],
                  "redis": ["--kv-remote", "redis", "--kv-remote-memory", "1GiB"],
                  "mooncake": ["--kv-remote", "mooncake", "--kv-remote-memory", "1GiB"]}
    out = {}
    for tier in args.tiers.split(","):
        out[tier] = _run_cluster(tier_flags[tier], trace, conversations, args)
        for name in [n for n in ("trace", "multi_turn") if n in out[tier]]:
            r = out[tier][name]
            hit = r["hit_rate_of_reusable"]
            print(f"{tier:9s} {name:10s} requests {r['requests']:3d} prompt {r['prompt_tokens']:6d} computed "
                  f"{r['computed_tokens']:6d} hit/reusable {hit if hit is None else round(hit, 3)}  "
                  f"TTFT p50 {r['ttft_p50_s'] * 1e3:7.1f} ms  p90 {r['ttft_p90_s'] * 1e3:7.1f} ms", flush=True)
    if "off" in out:
        for tier in out:
            for name in [n for n in ("trace", "multi_turn") if n in out[tier]]:
                out[tier][name]["ttft_p50_speedup_vs_off"] = out["off"][name]["ttft_p50_s"] / out[tier][name]["ttft_p50_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bandwidth")
    b.add_argument("--shape", choices=SHAPES, default="smollm2")
    b.add_argument("--tokens", default="512,2048")
    b.add_argument("--tiers", default="host,disk,redis,mooncake")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=1, help="torch threads (a worker pinned to one core has 1)")
    r = sub.add_parser("replay")
    r.add_argument("--tiers", default="off,host,disk,redis,mooncake")
    r.add_argument("--trace-requests", type=int, default=40)
    r.add_argument("--host-memory", default="1GiB",
                   help="the host tier's budget (the trace's working set: ~46 KB a token for SmolLM2 in float32)")
    r.add_argument("--length-scale", type=float, default=1 / 32)
    r.add_argument("--conversations", type=int, default=3,
                   help="an odd number: round robin over two workers then sends each conversation's turns to "
                        "alternate workers (an even one pins a conversation to one worker: no reuse crosses)")
    r.add_argument("--turns", type=int, default=4)
    r.add_argument("--first-len", type=int, default=600)
    r.add_argument("--turn-len", type=int, default=64)
    r.add_argument("--turn-output", type=int, default=32)
    r.add_argument("--gap-s", type=float, default=0.3, help="pause between requests (a save's time to land)")
    r.add_argument("--kv-cache", default="96MiB")
    for p in (b, r):
        p.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    result = bandwidth(args) if args.cmd == "bandwidth" else replay(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
