"""Checks shared by the e2e modules (one module per cluster mode)."""
from __future__ import annotations

import threading

import httpx
import openai

from cluster_helpers import (CHAT, MAX_TOKENS, MODEL, SEED, SEEDED_TEMPERATURE, health, offline_reference,
                             offline_seeded_reference, token_ids_from_logprobs, wait_idle)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)


def check_greedy_matches_offline(url: str) -> None:
    prompt_ids, expected, _ = offline_reference()
    c = client(url)
    for ids, want in zip(prompt_ids, expected):
        for _ in range(2):  # the second time the decode worker's prefix cache holds part of the prompt
            r = c.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                     extra_body={"return_tokens_as_token_ids": True})
            assert token_ids_from_logprobs(r.choices[0].logprobs.tokens) == want
            got = []
            text = ""
            for chunk in c.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0,
                                              logprobs=0, stream=True,
                                              extra_body={"return_tokens_as_token_ids": True}):
                if chunk.choices:
                    text += chunk.choices[0].text
                    if chunk.choices[0].logprobs:
                        got += token_ids_from_logprobs(chunk.choices[0].logprobs.tokens)
            assert got == want
            assert text == r.choices[0].text


def check_seeded_matches_offline(url: str) -> None:
    """A seeded sampled request gives the offline engine's tokens, also when its first token is sampled
    on a prefill worker and the rest on a decode worker."""
    ids, want = offline_seeded_reference()
    r = client(url).completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=SEEDED_TEMPERATURE,
                                       seed=SEED, logprobs=0, extra_body={"return_tokens_as_token_ids": True,
                                                                          "ignore_eos": True})
    assert token_ids_from_logprobs(r.choices[0].logprobs.tokens) == want


def check_chat_matches_offline(url: str) -> None:
    _, _, want = offline_reference()
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == want
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True) if ch.choices)
    assert streamed == want


def check_bad_input_then_served(url: str) -> None:
    bad = httpx.post(f"{url}/v1/completions", content=b"{oops", headers={"content-type": "application/json"},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    c = client(url)
    for kwargs in ({"max_tokens": -1}, {"n": 0}, {"extra_body": {"bogus": 1}}, {"prompt": [[1, 2], "x"]},
                   {"prompt": "x" * 40000}, {"prompt": ["Hello", ""]}, {"prompt": ["Hello", ""], "stream": True}):
        args = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **kwargs}
        try:
            c.completions.create(**args)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["type"] == "invalid_request_error"
        else:
            raise AssertionError(f"{kwargs} was accepted")
    try:
        c.completions.create(model="not-this-one", prompt="hello", max_tokens=4)
    except openai.NotFoundError as e:  # as OpenAI answers
        assert e.status_code == 404 and e.body["code"] == "model_not_found"
    else:
        raise AssertionError("an unknown model was accepted")
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def check_disconnects_free_blocks(url: str, num_requests: int = 6) -> None:
    streams = []
    with httpx.Client(timeout=60) as http:
        for i in range(num_requests):
            body = {"model": MODEL, "prompt": f"Count to one thousand, request {i}:", "max_tokens": 500,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            cm = http.stream("POST", f"{url}/v1/completions", json=body)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # first token arrived
            streams.append(cm)
        busy = health(url)
        assert sum(w["num_inflight"] for w in busy["workers"] if w.get("alive")) > 0
        for cm in streams:  # the client goes away mid-stream
            cm.__exit__(None, None, None)
    for i in range(2):  # non-streaming clients that give up
        body = {"model": MODEL, "prompt": f"Impatient {i}:", "max_tokens": 500, "ignore_eos": True}
        try:
            httpx.post(f"{url}/v1/completions", json=body, timeout=2.0)
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("500 tokens in under 2 s: make the request longer")
    h = wait_idle(url)
    assert h["num_inflight"] == 0
    assert all(w["num_free_blocks"] == w["num_blocks"] for w in h["workers"] if w.get("alive"))


def check_kv_integrity(url: str) -> None:
    """Blocks the decode worker received are bit-identical to the prefill worker's."""
    prompt_ids, _, _ = offline_reference()
    ids = prompt_ids[1]  # several full blocks
    client(url).completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    d = httpx.post(f"{url}/debug/kv_digests", json={"prompt_token_ids": ids}, timeout=30).json()
    by_role = {}
    for w in health(url)["workers"]:
        by_role.setdefault(w["role"], []).append(d["workers"][w["worker_id"]])
    [prefill], [decode] = by_role["prefill"], by_role["decode"]
    assert len(prefill) == len(ids) // 16 >= 3, (len(ids), prefill)
    assert all(prefill) and prefill == decode


def check_worker_killed(url: str) -> None:
    """SIGKILL the prefill worker mid-request, then the decode worker mid-stream: every request ends
    (tokens or a clear error), /health shows the dead workers, nothing hangs."""
    import os
    import signal
    import threading
    import time

    prompt_ids, expected, _ = offline_reference()
    workers = {w["role"]: w for w in health(url)["workers"]}
    results: list = []

    def request(ids, max_tokens):
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=60)
            results.append(r.status_code)
        except httpx.HTTPError as e:  # a hang would show up here as a timeout
            results.append(e)

    threads = [threading.Thread(target=request, args=(prompt_ids[1], 8)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(workers["prefill"]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert all(code in (200, 503) for code in results), results
    deadline = time.monotonic() + 15
    while any(w["alive"] for w in health(url)["workers"] if w["role"] == "prefill"):
        assert time.monotonic() < deadline, "the dead prefill worker still shows alive"
        time.sleep(0.2)
    h = health(url)
    assert h["status"] == "ok"  # the decode worker computes prompts itself now
    r = client(url).completions.create(model=MODEL, prompt=prompt_ids[0], max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    assert token_ids_from_logprobs(r.choices[0].logprobs.tokens) == expected[0]

    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.kill(workers["decode"]["pid"], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and any('"error"' in line for line in rest), rest[-3:]
    deadline = time.monotonic() + 15
    while httpx.get(f"{url}/health", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "health still 200 without any decode worker"
        time.sleep(0.2)
    late = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert late.status_code == 503 and "retry-after" in late.headers


class GreedyLoad:
    """``num_requests`` concurrent greedy completions of the offline reference's prompts, started a few at a
    time (``start``) around whatever a test does to the cluster meanwhile; ``check``: every one ended with the
    offline engine's tokens, then the cluster goes idle with every block free and its bookkeeping intact."""

    def __init__(self, url: str, num_requests: int) -> None:
        self.url = url
        self.prompt_ids, self.expected, _ = offline_reference()
        self.results: dict[int, list[int] | Exception] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(num_requests)]
        self._started = 0

    def start(self, num: int) -> None:
        for t in self.threads[self._started:self._started + num]:
            t.start()
        self._started += num

    def check(self) -> None:
        self.start(len(self.threads) - self._started)
        for t in self.threads:
            t.join(300)
        assert len(self.results) == len(self.threads)
        for i, got in self.results.items():
            assert got == self.expected[i % len(self.expected)], (i, got)
        h = wait_idle(self.url)
        assert all(w["num_free_blocks"] == w["num_blocks"] for w in h["workers"])
        integrity = httpx.post(f"{self.url}/debug/check_integrity", timeout=30).json()["workers"]
        assert integrity and all(v == "" for v in integrity.values()), integrity

    def _run(self, i: int) -> None:
        try:
            r = client(self.url).completions.create(
                model=MODEL, prompt=self.prompt_ids[i % len(self.prompt_ids)], max_tokens=MAX_TOKENS,
                temperature=0, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
            self.results[i] = token_ids_from_logprobs(r.choices[0].logprobs.tokens)
        except Exception as e:  # noqa: BLE001 - recorded, and failed on in check()
            self.results[i] = e
