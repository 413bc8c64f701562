"""An out-of-tree device backend (``pdserve_testchip``, tests/conftest.py: CPU-backed, its own attention, KV
allocation and block copies) installed by its entry point alone runs the default model through the offline
engine and the CLI, with the CPU's greedy tokens, and pdserve really calls into it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdserve import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
# float32 and dequantized weights: the plugin's attention takes RoPE out of the CPU kernel that fuses it,
# a ~1e-6 difference that float32 GEMMs keep that small. (Quantized GEMMs with 8-bit activations turn it
# into ~1e-2 in the logprobs, enough to flip a near tie: measured at "The capital of France is".)
SETTINGS = dict(dtype="float32", quantization="none", kv_cache_memory="64MiB", max_model_len=256)
MAX_TOKENS = 12
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def cpu_outputs(default_model_path):
    llm = LLM("smollm2-135m", device="cpu", **SETTINGS)
    return [r.outputs[0] for r in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def cpu_token_ids(cpu_outputs) -> list[list[int]]:
    return [o.token_ids for o in cpu_outputs]


def test_offline_engine_on_the_plugin_matches_the_cpu(testchip, cpu_outputs, cpu_token_ids):
    llm = LLM("smollm2-135m", device="testchip", **SETTINGS)
    engine = llm.engine
    assert type(engine.backend).__module__ == "pdserve_testchip" and engine.device.type == "cpu"
    calls_after_load = dict(testchip.CALLS)
    assert calls_after_load["allocate_kv_cache"] == 1 and calls_after_load["attention"] == 0
    outputs = [r.outputs[0] for r in llm.generate(PROMPTS, PARAMS)]
    assert [o.token_ids for o in outputs] == cpu_token_ids
    for chip, cpu in zip(outputs, cpu_outputs):
        assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(chip.logprobs, cpu.logprobs, strict=True))
    # Every layer of every step attended through the plugin: at least one step per generated token.
    assert testchip.CALLS["attention"] >= engine.arch.num_layers * MAX_TOKENS
    assert testchip.CALLS["attention"] % engine.arch.num_layers == 0


def test_cli_finds_the_plugin_in_a_fresh_process(testchip_dir, cpu_token_ids):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(testchip_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pdserve.cli", "--log-level", "warning", "generate", "--device", "testchip",
           "--dtype", "float32", "--quantization", "none", "--kv-cache-memory", "64MiB", "--max-model-len", "256",
           "--max-tokens", str(MAX_TOKENS), "--json", "--", PROMPTS[0]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Without ignore_eos the CLI may stop early: a prefix of the CPU's greedy tokens.
    assert result["token_ids"] and result["token_ids"] == cpu_token_ids[0][:len(result["token_ids"])]

    bad = subprocess.run([*cmd[:6], "--device", "nosuchchip", *cmd[8:]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1
    assert "unknown device 'nosuchchip': known devices are auto, cpu, cuda, testchip" in bad.stderr
