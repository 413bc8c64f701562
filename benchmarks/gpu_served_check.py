"""The served GPU check: 1 prefill + 1 decode worker on one GPU, random weights at Llama-3.1-8B's shapes,
the openai client's greedy output against the offline engine's, and the KV transfer bandwidth.

A model folder is written first: Llama-3.1-8B's config.json (32 layers, 4096 hidden, 8 KV heads of 128) with
the default model's tokenizer and vocabulary (49,152 tokens instead of 128,256: there is no Llama tokenizer
here, and the vocabulary only sizes the embedding and the LM head), loaded with ``--load-format dummy``.
Then, one after the other:

1. the offline engine's greedy tokens for a few prompts (lone requests: the same GEMM shapes as the
   cluster's prefill and decode steps, so bfloat16 results are comparable token for token);
2. ``pdserve up`` with the ``auto`` connector (both workers on one node with caches on the GPU: CUDA IPC,
   device to device) and layer-wise streaming: greedy output through the openai client, KV digests of both
   workers equal;
3. the same with ``--no-kv-layerwise`` (whole-request transfers, so each transfer's time is the copy's):
   KV bytes / transfer seconds from /metrics for prompts of --bandwidth-tokens tokens;
4. the same with ``--kv-connector tcp`` (blocks staged through pinned host memory both ways).

    .venv/bin/python benchmarks/gpu_served_check.py [--prompt-tokens 512] [--bandwidth-tokens 4096]
    .venv/bin/python benchmarks/gpu_served_check.py --model smollm2-135m --dtype float32 --prompt-tokens 64 \
        --bandwidth-tokens 512 --kv-cache-memory 96MiB      # a quick CPU run that checks the script itself

Prints one line per check and a table of bandwidths; exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="a built-in shape (model/arch.py)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--bandwidth-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-memory", default="8GiB")
    ap.add_argument("--port", type=int, default=8321)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pdserve-8b-"))
    write_model_folder(folder, args.model)
    prompts = make_prompts(args.prompt_tokens, 3)
    expected = offline(folder, prompts, args)
    print(f"offline: {len(prompts)} prompts of {args.prompt_tokens} tokens, greedy, {args.max_tokens} tokens each")
    ok = True
    rows = []
    import torch

    near = "CUDA IPC" if torch.cuda.is_available() else "shm"  # what auto picks within a node for this cache
    staged = "pinned staging" if torch.cuda.is_available() else "host cache"
    runs = ((f"auto ({near}), layer-wise", []), (f"auto ({near}), whole request", ["--no-kv-layerwise"]),
            (f"tcp ({staged}), whole request", ["--kv-connector", "tcp", "--no-kv-layerwise"]))
    for label, flags in runs:
        with served(folder, args, flags) as url:
            got = greedy(url, prompts, args)
            same = got == expected
            digests = kv_digests_equal(url, prompts[0])
            print(f"{label}: greedy equal to offline: {same}; KV digests equal on both workers: {digests}", flush=True)
            ok &= same and digests
            if "--no-kv-layerwise" in flags:  # a streamed transfer's reported time is only its last notice
                rows.append((label, bandwidth(url, args)))
    print(f"\n{'KV transfer (' + str(args.bandwidth_tokens) + '-token prompts, median of 4)':<52} {'GB/s':>8}")
    for label, gbps in rows:
        print(f"{label:<52} {gbps:>8.2f}")
    return 0 if ok else 1


def write_model_folder(folder: Path, model: str) -> None:
    """A built-in shape (Llama-3.1-8B's) with the default model's tokenizer (its vocabulary)."""
    from pdserve.model.arch import BUILTIN_ARCHS
    from pdserve.model.tokenizer import load_tokenizer

    a = BUILTIN_ARCHS[model]
    tok = load_tokenizer("smollm2-135m")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tok.hf),
              "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
              "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
              "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "max_position_embeddings": 16384,
              "rms_norm_eps": a.rms_norm_eps, "rope_theta": a.rope_theta, "tie_word_embeddings": False,
              "bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    tok.hf.save_pretrained(str(folder))


def make_prompts(num_tokens: int, n: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, 40000) for _ in range(num_tokens)] for _ in range(n)]


def offline(folder: Path, prompts: list[list[int]], args) -> list[list[int]]:
    import torch

    from pdserve import LLM, SamplingParams

    llm = LLM(str(folder), load_format="dummy", dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
              max_model_len=16384)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    out = [list(llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids) for p in prompts]
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


class served:
    """``pdserve up`` on this GPU for the model folder; the base URL while it runs."""

    def __init__(self, folder: Path, args, flags: list[str]) -> None:
        self.argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", str(folder), "--load-format", "dummy",
                     "--dtype", args.dtype, "--prefill", "1", "--decode", "1", "--kv-cache-memory",
                     args.kv_cache_memory, "--port", str(args.port), "--enable-debug-endpoints",
                     "--max-model-len", "16384", "--max-num-batched-tokens", "8192", *flags]
        if "--kv-connector" not in flags:
            self.argv += ["--kv-connector", "auto"]
        self.url = f"http://127.0.0.1:{args.port}"

    def __enter__(self) -> str:
        from pdserve.cluster.local import wait_healthy

        self.log = open(Path(tempfile.gettempdir()) / "pdserve-gpu-served.log", "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, 600)
        return self.url

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def greedy(url: str, prompts: list[list[int]], args) -> list[list[int]]:
    import openai

    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300, max_retries=0)
    out = []
    for p in prompts:
        r = c.completions.create(model=c.models.list().data[0].id, prompt=p, max_tokens=args.max_tokens,
                                 temperature=0, logprobs=0,
                                 extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        out.append([int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens])
    return out


def kv_digests_equal(url: str, prompt: list[int]) -> bool:
    import httpx

    d = httpx.post(f"{url}/debug/kv_digests", json={"prompt_token_ids": prompt}, timeout=60).json()["workers"]
    digests = list(d.values())
    return len(digests) == 2 and all(digests[0]) and digests[0] == digests[1]


def bandwidth(url: str, args) -> float:
    """GB/s of the prefill worker's whole-request KV transfers, one fresh prompt of --bandwidth-tokens at a
    time (bytes and seconds of each from /metrics' counters), median of 4."""
    import statistics

    import httpx

    def totals() -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        get = lambda name: sum(float(m) for m in re.findall(rf'^{name}\{{role="prefill"\}} (\S+)$', text, re.M))  # noqa: E731
        return get("pdserve:kv_transfer_bytes_total"), get("pdserve:kv_transfer_seconds_sum")

    rates = []
    for i in range(4):
        b0, s0 = totals()
        greedy(url, [[100 + i] + make_prompts(args.bandwidth_tokens - 1, 1)[0]], argparse.Namespace(max_tokens=2))
        time.sleep(0.5)  # the prefill worker's PrefillDone reaches the frontend's counters
        b1, s1 = totals()
        if s1 > s0:
            rates.append((b1 - b0) / (s1 - s0) / 1e9)
    return statistics.median(rates) if rates else float("nan")


if __name__ == "__main__":
    sys.exit(main())
