"""End to end, faults on 1 prefill + 2 decode workers (issue 15): a decode worker killed mid-stream, its
stream goes on on the other decode worker (the prompt and the tokens so far re-prefilled) and its greedy
tokens equal an uninterrupted run's; `pdserve up` restarts the dead worker on its address and the frontend
re-admits it; its shared-memory KV file is gone. A decode worker stopped (SIGSTOP) past the liveness
timeout: its streams move and finish right, it is re-admitted when it runs again (SIGCONT), what it still
held is aborted there, and every block comes back."""
from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster_helpers import DTYPE, KV_CACHE, MODEL, PROMPTS, health, local_cluster, quant_act_bits_as_cluster, \
    require_model, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NUM_TOKENS = 40


@pytest.fixture(scope="module")
def url():
    require_model()
    with local_cluster("--prefill", "1", "--decode", "2", "--worker-timeout", "3") as (base, _):
        yield base


@functools.cache
def _reference() -> tuple[list[int], list[int]]:
    from pdserve import LLM, SamplingParams

    with quant_act_bits_as_cluster():
        llm = LLM(MODEL, kv_cache_memory=KV_CACHE, dtype=DTYPE)
        ids = llm.get_tokenizer().encode(PROMPTS[1])
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=NUM_TOKENS,
                                                                       ignore_eos=True))
    return ids, list(out[0].outputs[0].token_ids)


def _stream(url: str, ids: list[int], got: list, on_token=None) -> None:
    body = {"model": MODEL, "prompt": ids, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                got.append(chunk)
                return
            for choice in chunk["choices"]:
                for tok in (choice.get("logprobs") or {}).get("tokens", []):
                    got.append(int(tok.removeprefix("token_id:")))
                    if on_token is not None:
                        on_token(len(got))


def _serving_decode(url: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = [w for w in health(url)["workers"] if w["role"] == "decode" and w["alive"] and w["num_inflight"]]
        if busy:
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no decode worker took the request")


def _migrations(url: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("pdserve:request_migrations_total"))


def _wait(pred, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_decode_death_mid_stream_migrates_and_the_worker_comes_back(url):
    ids, expected = _reference()
    got: list = []
    started = threading.Event()
    reader = threading.Thread(target=_stream, args=(url, ids, got, lambda n: n >= 8 and started.set()))
    moved = _migrations(url)
    reader.start()
    assert started.wait(60), got
    victim = _serving_decode(url)
    files = list(Path("/dev/shm").glob(f"pdserve-kv-{victim['pid']}-*"))
    os.kill(victim["pid"], signal.SIGKILL)
    reader.join(120)
    assert got == expected  # one stream, no token missing or repeated, as without the death
    assert _migrations(url) == moved + 1
    # `pdserve up` restarts it on its address; the frontend re-admits it (a new pid); its KV file is gone
    _wait(lambda: any(w["worker_id"] == victim["worker_id"] and w["alive"] and w["pid"] != victim["pid"]
                      for w in health(url)["workers"]), "the killed worker was not restarted and re-admitted")
    assert files and not any(f.exists() for f in files)
    again: list = []
    _stream(url, ids, again)
    assert again == expected


def test_stopped_decode_worker_is_presumed_dead_then_readmitted(url):
    ids, expected = _reference()
    got: list = []
    started = threading.Event()
    reader = threading.Thread(target=_stream, args=(url, ids, got, lambda n: n >= 4 and started.set()))
    moved = _migrations(url)
    reader.start()
    assert started.wait(60), got
    victim = _serving_decode(url)
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        reader.join(120)
        assert got == expected  # moved to the other decode worker after the 3 s liveness timeout
        assert _migrations(url) == moved + 1
        assert not next(w for w in health(url)["workers"] if w["worker_id"] == victim["worker_id"])["alive"]
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    _wait(lambda: next(w for w in health(url)["workers"] if w["worker_id"] == victim["worker_id"])["alive"],
          "the stopped worker was not re-admitted")
    h = wait_idle(url)  # what it still ran is aborted there: every block comes back
    assert all(w["num_free_blocks"] == w["num_blocks"] for w in h["workers"] if w["alive"])
    assert health(url)["status"] == "ok"
