"""The HTTP layer with a scripted fake cluster: validation -> OpenAI 400 bodies, auth, SSE, stop strings,
n, usage, overload. No workers, no model: a character-level tokenizer stands in."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pdserve.control.attainment import Attainment, Objectives
from pdserve.errors import OverloadedError
from pdserve.server.app import create_app
from pdserve.server.client import FrontendOptions, RequestEvent
from pdserve.protocol import LogprobEntry, TokenOutput, WorkerInfo

MODEL = "tiny"
MAX_MODEL_LEN = 64


class CharTokenizer:
    vocab_size = 256
    eos_token_ids = (0,)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


class FakeClient:
    """Answers every request with ``reply`` one character per token (then finish 'length')."""

    def __init__(self, reply="Hello world. Bye", can_serve=True):
        self.reply = reply
        self.serving = can_serve
        self.aborted: list[str] = []
        self.received: list = []
        self.metrics = None
        self.conns = {}
        self.overloaded = False
        self.attainment = Attainment(Objectives())
        self.options = FrontendOptions(())  # the objectives the dashboard's monitor judges by

    async def start(self):
        pass

    async def stop(self):
        pass

    def model_info(self):
        return WorkerInfo("w0", "both", MODEL, 1, "h", 16, 100, MAX_MODEL_LEN)

    def can_serve(self):
        return self.serving

    def health(self):
        return {"status": "ok" if self.serving else "unavailable", "workers": []}

    async def generate(self, prompt_ids, params, request_id=None):
        if self.overloaded:
            raise OverloadedError("busy", retry_after_s=2.0)
        self.received.append((prompt_ids, params))
        for i, sp in enumerate(params):
            n = min(len(self.reply), sp.max_tokens or len(self.reply))
            for k in range(n):
                tok = ord(self.reply[k])
                lps = [LogprobEntry(tok, -0.5, 1, [tok], [-0.5])] if sp.logprobs is not None else None
                yield RequestEvent(i, f"{request_id}-{i}", TokenOutput(
                    f"{request_id}-{i}", [tok], "length" if k == n - 1 else None, None, len(prompt_ids), 0, lps))

    def abort_nowait(self, ids):
        self.aborted.extend(ids)


@pytest.fixture
def fake():
    return FakeClient()


@pytest.fixture
def http(fake):
    app = create_app(fake, MODEL, CharTokenizer)
    with TestClient(app) as c:
        yield c


def _error(resp, status=400, param="__any__"):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param != "__any__":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "hi", "n": 1000}, "n"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100}, "max_tokens"),  # 2 + 100 > 64
    ({"model": MODEL, "prompt": "x" * 80}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2], "a"]}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({"model": "gpt-4", "prompt": "hi"}, "model"),
    ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, "stop"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_completion_validation_errors(http, fake, body, param):
    _error(http.post("/v1/completions", json=body), param=param)
    assert fake.received == []


def test_unknown_model_code(http):
    assert _error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}))["code"] == "model_not_found"


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
])
def test_chat_validation_errors(http, body, param):
    _error(http.post("/v1/chat/completions", json=body), param=param)


def test_malformed_json_then_next_request_served(http):
    _error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}))
    _error(http.post("/v1/completions", content=b"[1, 2]"))
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "Hello"


def test_completion_shapes_n_usage_and_multiple_prompts(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 3}).json()
    assert r["object"] == "text_completion" and r["model"] == MODEL
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "Hel" and c["finish_reason"] == "length" for c in r["choices"])
    assert r["usage"]["prompt_tokens"] == 5 and r["usage"]["completion_tokens"] == 12
    assert r["usage"]["total_tokens"] == 17


def test_token_id_prompts(http, fake):
    http.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2, 3], [4]], "max_tokens": 1})
    assert [ids for ids, _ in fake.received] == [[1, 2, 3], [4]]


def test_stop_string_cuts_text_and_aborts_on_workers(http, fake):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stop": [". "], "max_tokens": 16}).json()
    c = r["choices"][0]
    assert c["text"] == "Hello world" and c["finish_reason"] == "stop" and c["stop_reason"] == ". "
    assert len(fake.aborted) == 1
    assert r["usage"]["completion_tokens"] == len("Hello world. ")


def test_sampling_extras_reach_the_engine(http, fake):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "min_p": 0.1, "min_tokens": 2, "ignore_eos": True, "repetition_penalty": 1.2, "seed": 3,
            "frequency_penalty": 0.5, "presence_penalty": -0.5, "stop_token_ids": [7]}
    assert http.post("/v1/completions", json=body).status_code == 200
    sp = fake.received[0][1][0]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.min_tokens, sp.ignore_eos) == (0.5, 0.9, 5, 0.1, 2, True)
    assert (sp.repetition_penalty, sp.seed, sp.frequency_penalty, sp.presence_penalty) == (1.2, 3, 0.5, -0.5)
    assert sp.stop_token_ids == [7]


def _sse(resp):
    events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_completion_with_usage(http):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as resp:
        resp.read()
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_streaming_chat_and_logprobs(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
            "stream": True, "logprobs": True, "top_logprobs": 1}) as resp:
        resp.read()
    chunks = _sse(resp)
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hel"
    lps = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in lps] == ["H", "e", "l"] and lps[0]["top_logprobs"][0]["logprob"] == -0.5


def test_chat_non_streaming_and_token_ids_logprobs(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2, "logprobs": True,
                                                "return_tokens_as_token_ids": True}).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"] == {"role": "assistant", "content": "He"}
    assert [e["token"] for e in r["choices"][0]["logprobs"]["content"]] == [f"token_id:{ord('H')}",
                                                                            f"token_id:{ord('e')}"]


def test_completion_logprobs_shape(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e"] and lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 1]


def test_overload_is_429_with_retry_after(http, fake):
    fake.overloaded = True
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    _error(resp, 429)
    assert int(resp.headers["retry-after"]) >= 1
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True})
    _error(resp, 429)  # a streaming request fails before its first byte with the real status


def test_health_503_and_models(fake):
    fake.serving = False
    with TestClient(create_app(fake, MODEL, CharTokenizer)) as c:
        assert c.get("/health").status_code == 503
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == MODEL


def test_api_key(fake):
    with TestClient(create_app(fake, MODEL, CharTokenizer, api_key="sekrit")) as c:
        err = _error(c.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_api_key_on_every_v1_route(fake):
    with TestClient(create_app(fake, MODEL, CharTokenizer, api_key="k")) as c:
        _error(c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 401)
        _error(c.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 401)
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                    headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


def test_streaming_several_prompts_and_n(http):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 3,
                                                       "stream": True}) as resp:
        resp.read()
    chunks = _sse(resp)
    texts: dict[int, str] = {}
    finished = set()
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert texts == {i: "Hel" for i in range(4)} and finished == {0, 1, 2, 3}
