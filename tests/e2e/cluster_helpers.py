"""Helpers for the end-to-end tests: a local cluster (``pdserve up``) as a context, the offline reference.

Each test module starts one cluster (module-scoped fixture) and stops it with SIGTERM, as a user would.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from pdserve.cluster.local import free_port, wait_healthy

MODEL = "smollm2-135m"
KV_CACHE = "96MiB"
# Token-for-token checks compare a cluster (batches, prefix-cache hits, KV moved between workers) with the
# offline engine (one prompt at a time). Their GEMMs see other batch shapes, and oneDNN's bfloat16 GEMM
# is not bit-identical across shapes: one ulp flips a near-tie (measured on these prompts). In float32
# the same differences stay far below any gap between two tokens' logits.
DTYPE = "float32"
# The default model's weights stay quantized (--quantization auto), and the quantized GEMM rounds activations
# to 15 bits in products of up to 8 rows and to 8 bits above (~1% noise a product): a request's greedy tokens
# would depend on how many others share its batch (measured: a flip at the 6th token with 18 concurrent
# requests). The checks fix the width at 15 bits, on the cluster's workers and in the offline engine alike;
# rows are rounded one by one, so every batch shape then gives the single-request result (bit for bit:
# tests/unit/test_quant_kernels.py).
QUANT_ACT_BITS = "16"
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint. Once upon a time, in a small workshop at the edge "
    "of a quiet town, there lived a robot named Pixel. Pixel had been built to sort screws and bolts, but it "
    "dreamed of colors: the orange of sunsets, the green of spring leaves. Every morning Pixel",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
CHAT = [{"role": "user", "content": "Name three colors."}]


def require_model() -> None:
    import pytest

    from pdserve.model.registry import resolve_model_path

    if not resolve_model_path(MODEL).is_file():
        pytest.skip(f"default model not downloaded: run `pdserve pull`")


@contextmanager
def local_cluster(*flags: str, timeout_s: float = 300.0, env: dict[str, str] | None = None):
    """Run ``pdserve up`` with ``flags`` (later flags win over the defaults here) and ``env`` (default:
    this process's); yield (base_url, process); SIGTERM it afterwards and check that no child is left
    behind. Its output goes to ``log_path(base_url)``."""
    port = free_port()
    log = log_path(f"http://127.0.0.1:{port}")
    argv = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--kv-cache-memory", KV_CACHE,
            "--dtype", DTYPE, "--enable-debug-endpoints", "--worker-timeout", "10", *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**(os.environ if env is None else env), "PDSERVE_QUANT_ACT_BITS": QUANT_ACT_BITS})
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log}:\n{log.read_text()[-3000:]}") from None
        yield url, proc
    finally:
        children = _children(proc.pid)
        stop(proc, log, 30)
        time.sleep(0.5)
        left = [pid for pid in children if _alive(pid)]
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        assert not left, f"orphaned children {left}; see {log}"


def stop(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """SIGTERM, as a user stops `pdserve up`; AssertionError (after killing its group) if it does not stop."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"pdserve up did not stop on SIGTERM; see {log}") from None


def log_path(url: str) -> Path:
    """Where ``local_cluster`` writes the output of the cluster at ``url``."""
    port = url.rsplit(":", 1)[1]
    return Path(os.environ.get("PDSERVE_E2E_LOG_DIR", "/tmp")) / f"pdserve-e2e-{port}.log"


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url: str, timeout_s: float = 60.0) -> dict:
    """Until every live worker reports no running/waiting/held requests and no KV blocks in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = health(url)
        live = [w for w in h["workers"] if w.get("alive")]
        if live and all(w["num_running"] == 0 and w["num_waiting"] == 0 and w["num_awaiting_kv"] == 0
                        and w["num_held_kv"] == 0 and w["kv_usage"] == 0.0 for w in live):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle with all blocks free: {h}")
        time.sleep(0.5)


@functools.lru_cache(maxsize=1)
def offline_reference() -> tuple[list[list[int]], list[list[int]], str]:
    """Greedy token ids of every prompt (as text, and as token ids) and the chat reply text, from the
    offline engine, one prompt at a time."""
    from pdserve import LLM, SamplingParams

    with quant_act_bits_as_cluster():
        llm = LLM(MODEL, kv_cache_memory=KV_CACHE, dtype=DTYPE)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        tokenizer = llm.get_tokenizer()
        prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
        outs = [llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids for ids in prompt_ids]
        chat = llm.chat(CHAT, params)[0].outputs[0].text
        del llm
    return prompt_ids, [list(o) for o in outs], chat


SEED, SEEDED_TEMPERATURE = 1234, 0.9


@functools.cache
def offline_seeded_reference() -> tuple[list[int], list[int]]:
    """Token ids the offline engine samples for the first prompt with a fixed seed and temperature."""
    from pdserve import LLM, SamplingParams

    with quant_act_bits_as_cluster():
        llm = LLM(MODEL, kv_cache_memory=KV_CACHE, dtype=DTYPE)
        ids = llm.get_tokenizer().encode(PROMPTS[0])
        params = SamplingParams(temperature=SEEDED_TEMPERATURE, seed=SEED, max_tokens=MAX_TOKENS,
                                ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids
        del llm
    return ids, list(out)


@contextmanager
def quant_act_bits_as_cluster():
    """The offline engine, inside, rounds activations as ``local_cluster``'s workers do (``QUANT_ACT_BITS``)."""
    from pdserve.model import quant_weight

    saved = quant_weight.ACTIVATION_BITS
    quant_weight.ACTIVATION_BITS = QUANT_ACT_BITS
    try:
        yield
    finally:
        quant_weight.ACTIVATION_BITS = saved


def token_ids_from_logprobs(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
