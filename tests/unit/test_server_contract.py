"""The HTTP API as a contract, over real HTTP to the app (a scripted cluster behind it): OpenAI's nulls and
integers, max_tokens defaults and the server cap, a batch with a failing prompt, response bodies that
conform to the published models, and the OpenAPI document itself."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from pdserve.errors import InvalidRequestError
from pdserve.server import api_responses as r
from pdserve.server.api_types import request_types
from pdserve.server.limits import DEFAULT_MAX_TOKENS_CAP, Limits
from pdserve.server.app import create_app
from pdserve.server.client import RequestEvent
from pdserve.protocol import TokenOutput
from test_server_api import MAX_MODEL_LEN, MODEL, CharTokenizer, FakeClient

CAP = 32


@pytest.fixture
def fake():
    return FakeClient(reply="Hello world. Bye" * 4)


@pytest.fixture
def http(fake):
    with TestClient(create_app(fake, MODEL, CharTokenizer, max_tokens_cap=CAP)) as c:
        yield c


def _sse_events(resp) -> list[str]:
    return [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e.startswith("data: ")]


# ---- OpenAI's nulls and integers ------------------------------------------------------------------------

# The fields OpenAI's OpenAPI document marks nullable (CreateCompletionRequest, CreateChatCompletionRequest)
OPENAI_COMPLETION_NULLABLE = ["best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
                              "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix",
                              "temperature", "top_p"]  # and prompt, tested on its own
OPENAI_CHAT_NULLABLE = ["audio", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens",
                        "max_tokens", "metadata", "modalities", "moderation", "n", "prediction", "presence_penalty",
                        "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "safety_identifier",
                        "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
                        "top_logprobs", "top_p", "verbosity"]
# and pdserve's own optional fields, vLLM's extras among them
EXTRA_NULLABLE = ["user", "top_k", "min_p", "min_tokens", "ignore_eos", "repetition_penalty", "stop_token_ids",
                  "skip_special_tokens", "include_stop_str_in_output", "return_tokens_as_token_ids"]
COMPLETION_NULLS = OPENAI_COMPLETION_NULLABLE + EXTRA_NULLABLE
CHAT_NULLS = OPENAI_CHAT_NULLABLE + EXTRA_NULLABLE + ["tools", "tool_choice", "parallel_tool_calls",
                                                      "response_format", "add_generation_prompt"]


def test_every_nullable_field_takes_null_as_its_default(http, fake):
    body = {"model": MODEL, "prompt": "hi", **{f: None for f in COMPLETION_NULLS}}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    sp = fake.received[-1][1][0]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.min_tokens, sp.max_tokens) == (1.0, 1.0, 0, 0.0, 0, 16)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, 0.0, 0.0)
    assert sp.stop == [] and sp.stop_token_ids == [] and sp.seed is None and sp.logprobs is None
    assert len(resp.json()["choices"]) == 1  # n: null is 1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": None}],
            **{f: None for f in CHAT_NULLS}}
    resp = http.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["logprobs"] is None


def test_integral_floats_are_integers(http, fake):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": [104.0, 105], "max_tokens": 5.0, "n": 2.0,
                                              "seed": 7.0, "logprobs": 1.0})
    assert resp.status_code == 200, resp.text
    ids, params = fake.received[-1]
    assert ids == [104, 105] and all(type(t) is int for t in ids)
    assert [sp.max_tokens for sp in params] == [5, 5] and type(params[0].max_tokens) is int
    assert params[0].seed == 7 and params[0].logprobs == 1
    assert len(resp.json()["choices"][0]["text"]) == 5


@pytest.mark.parametrize("value", [5.5, "5", True, 1e400, -1.0, [5], {"n": 5}])
def test_other_numbers_and_types_are_400(http, fake, value):
    resp = http.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "hi"})[:-1].encode()
                     + b', "max_tokens": ' + (b"1e400" if value == 1e400 else json.dumps(value).encode()) + b"}")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "max_tokens"
    assert fake.received == []


@pytest.mark.parametrize("field,value", [("stream", 1), ("echo", 0), ("ignore_eos", "true"), ("temperature", "1"),
                                         ("user", 5), ("stop", 3)])
def test_no_coercion_between_types(http, field, value):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", field: value})
    assert resp.status_code == 400 and resp.json()["error"]["param"].startswith(field), resp.text


@pytest.mark.parametrize("field,value", [("echo", True), ("suffix", "x"), ("logit_bias", {"1": 2}),
                                         ("best_of", 3)])
def test_unsupported_values_are_400_with_the_reason(http, field, value):
    err = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", field: value}).json()["error"]
    assert err["param"] == field and "not supported" in err["message"], err


@pytest.mark.parametrize("field,value", [("store", True), ("metadata", {"a": "b"}), ("service_tier", "auto"),
                                         ("tools", [{"type": "function"}]), ("tool_choice", "auto"),
                                         ("response_format", {"type": "json_object"})])
def test_unsupported_chat_values_are_400(http, field, value):
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                   field: value})
    assert resp.status_code == 400 and resp.json()["error"]["param"].startswith(field), resp.text


def test_null_prompt_starts_a_document(http, fake):
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": None, "max_tokens": 2}).status_code == 200
    assert fake.received[-1][0] == [CharTokenizer.eos_token_ids[0]]  # no BOS: the end-of-text token


# ---- max_tokens: defaults and the server cap ------------------------------------------------------------


def test_completion_max_tokens_defaults_to_16(http, fake):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert fake.received[-1][1][0].max_tokens == 16
    assert resp.json()["usage"]["completion_tokens"] == 16


def test_chat_max_tokens_defaults_to_what_fits_up_to_the_cap(fake):
    with TestClient(create_app(fake, MODEL, CharTokenizer, max_tokens_cap=8)) as c:
        c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert fake.received[-1][1][0].max_tokens == 8  # the cap: the context leaves more room
    long = "x" * 40
    with TestClient(create_app(fake, MODEL, CharTokenizer, max_tokens_cap=1000)) as c:
        c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]})
        prompt_len = len(CharTokenizer().apply_chat_template([{"role": "user", "content": long}]))
        assert fake.received[-1][1][0].max_tokens == MAX_MODEL_LEN - prompt_len  # what fits the context


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": CAP + 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": CAP + 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CAP + 1}),
])
def test_max_tokens_above_the_cap_is_400(http, fake, path, body):
    err = http.post(path, json={"model": MODEL, **body}).json()["error"]
    assert err["param"] in ("max_tokens", "max_completion_tokens") and str(CAP) in err["message"], err
    assert fake.received == []


def test_default_cap():
    assert DEFAULT_MAX_TOKENS_CAP >= 16
    with pytest.raises(ValueError):
        Limits(MODEL, MAX_MODEL_LEN, max_tokens_cap=0)


# ---- a batch in which one prompt fails ------------------------------------------------------------------


class FailingPromptClient(FakeClient):
    """Streams every prompt one token per event loop turn; the prompt "bad" fails after ``fail_after``
    tokens (0: refused at once), as a worker's refusal comes. Records which generators were closed."""

    def __init__(self, fail_after: int = 0):
        super().__init__(reply="abcdefgh")
        self.fail_after = fail_after
        self.closed: list[str] = []

    async def generate(self, prompt_ids, params, request_id=None):
        bad = "".join(chr(t) for t in prompt_ids) == "bad"
        try:
            for k in range(len(self.reply)):
                if bad and k == self.fail_after:
                    raise InvalidRequestError("prompt 1 is refused by the worker", "prompt")
                await asyncio.sleep(0.001)
                last = k == len(self.reply) - 1
                for i in range(len(params)):
                    yield RequestEvent(i, f"{request_id}-{i}", TokenOutput(
                        f"{request_id}-{i}", [ord(self.reply[k])], "length" if last else None, None, len(prompt_ids)))
        finally:
            self.closed.append(request_id)


@pytest.mark.parametrize("n", [1, 2])
def test_failing_prompt_in_a_batch_is_400_not_500(n):
    fake = FailingPromptClient()
    with TestClient(create_app(fake, MODEL, CharTokenizer)) as c:
        resp = c.post("/v1/completions", json={"model": MODEL, "prompt": ["good", "bad", "good too"], "n": n,
                                               "max_tokens": 8})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "prompt"
        assert len(fake.closed) == 3  # every prompt's stream was closed (its requests aborted)
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_failing_prompt_in_a_streamed_batch():
    fake = FailingPromptClient()  # refused before any token: the status says so
    with TestClient(create_app(fake, MODEL, CharTokenizer)) as c:
        resp = c.post("/v1/completions", json={"model": MODEL, "prompt": ["good", "bad"], "stream": True})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    fake = FailingPromptClient(fail_after=3)  # fails mid-stream: an error chunk, then [DONE]
    with TestClient(create_app(fake, MODEL, CharTokenizer)) as c:
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": ["good", "bad"], "stream": True,
                                                        "max_tokens": 8}) as resp:
            resp.read()
        assert resp.status_code == 200
        events = _sse_events(resp)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        r.ErrorResponse.model_validate(error)
        assert error["error"]["param"] == "prompt" and error["error"]["code"] == 400
        assert all("choices" in json.loads(e) for e in events[:-2])
        assert sorted(fake.closed) == sorted({f"{rid}" for rid in fake.closed}) and len(fake.closed) == 2


def test_empty_prompt_in_a_batch_is_400(http, fake):
    for stream in (False, True):
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello", ""], "stream": stream})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert fake.received == []


def test_a_bug_mid_stream_still_ends_with_an_error_chunk_and_done(caplog):
    class Buggy(FakeClient):
        async def generate(self, prompt_ids, params, request_id=None):
            yield RequestEvent(0, f"{request_id}-0", TokenOutput(f"{request_id}-0", [104], None, None, 2))
            raise RuntimeError(f"boom {''.join(chr(t) for t in prompt_ids)}")

    with TestClient(create_app(Buggy(), MODEL, CharTokenizer)) as c:
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "SECRET-PROMPT",
                                                        "stream": True}) as resp:
            resp.read()
    events = _sse_events(resp)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "internal_error"
    assert "SECRET-PROMPT" not in caplog.text


# ---- responses conform to the published models ---------------------------------------------------------


def test_bodies_conform_to_the_response_models(http):
    r.Completion.model_validate(http.post("/v1/completions", json={
        "model": MODEL, "prompt": ["ab", "c"], "n": 2, "max_tokens": 3, "logprobs": 1, "stop": "l"}).json())
    r.ChatCompletion.model_validate(http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3,
        "logprobs": True, "top_logprobs": 1}).json())
    for path, body, chunk in (
            ("/v1/completions", {"prompt": "hi", "logprobs": 0}, r.CompletionChunk),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
             r.ChatCompletionChunk)):
        with http.stream("POST", path, json={"model": MODEL, "max_tokens": 3, "stream": True,
                                             "stream_options": {"include_usage": True}, **body}) as resp:
            resp.read()
        events = _sse_events(resp)
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            chunk.model_validate_json(e)
    r.ModelList.model_validate(http.get("/v1/models").json())
    r.Health.model_validate(http.get("/health").json())
    r.ErrorResponse.model_validate(http.post("/v1/completions", json={"model": MODEL}).json())
    r.ErrorResponse.model_validate(http.get("/no/such/path").json())


# ---- the OpenAPI document -------------------------------------------------------------------------------


def _doc(http) -> dict:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def _resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_openapi_request_bodies_are_the_parsing_types(http):
    doc = _doc(http)
    completion, chat = request_types(Limits(MODEL, MAX_MODEL_LEN, CAP, CharTokenizer.vocab_size))
    for path, model in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        schema = _resolve(doc, body["content"]["application/json"]["schema"]["$ref"])
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schema == expected
        assert schema["additionalProperties"] is False
        assert schema["properties"]["model"]["const"] == MODEL
        assert schema["properties"]["max_tokens"]["anyOf"][0]["maximum"] == CAP


def test_openapi_nullable_where_openai_is(http):
    doc = _doc(http)
    for name, fields in (("CompletionRequest", COMPLETION_NULLS + ["prompt"]), ("ChatRequest", CHAT_NULLS)):
        props = doc["components"]["schemas"][name]["properties"]
        for f in fields:
            types = [branch.get("type") for branch in props[f].get("anyOf", [props[f]])]
            assert "null" in types, (name, f, props[f])
        assert {"type": "null"} not in props["model"].get("anyOf", [])


def test_openapi_responses_errors_and_media_types(http):
    doc = _doc(http)
    for path, ok, chunk in (("/v1/completions", "Completion", "CompletionChunk"),
                            ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk")):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "404", "429", "503", "504"}  # no key set: no 401
        content = responses["200"]["content"]
        assert content["application/json"]["schema"]["$ref"].endswith(f"/{ok}")
        data = content["text/event-stream"]["schema"]["properties"]["data"]
        refs = [s["$ref"] for s in data["else"]["contentSchema"]["anyOf"]]
        assert refs == [f"#/components/schemas/{chunk}", "#/components/schemas/ErrorResponse"]
        for code in ("400", "404", "429", "503", "504"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/ModelList")
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    cluster = doc["paths"]["/v1/cluster"]["get"]
    assert cluster["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClusterStatus")
    assert [(q["name"], q["schema"]["type"]) for q in cluster["parameters"]] == [("history_since", "number")]
    assert list(doc["paths"]["/dashboard"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert not any(path.startswith("/dashboard/") for path in doc["paths"])  # the page's assets: no API
    assert not any("422" in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    refs = _refs(doc)
    assert refs and all(ref.rsplit("/", 1)[1] in doc["components"]["schemas"] for ref in refs)


def test_openapi_with_a_key_documents_the_bearer_scheme_and_401(fake):
    with TestClient(create_app(fake, MODEL, CharTokenizer, api_key="k", enable_debug=True)) as c:
        doc = c.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path == "/health":
                assert op["security"] == [{}, {"bearerAuth": []}] and "401" not in op["responses"]
            elif path == "/dashboard":  # the page is open to all: it asks for the key itself
                assert op["security"] == [] and "401" not in op["responses"]
            else:
                assert op["security"] == [{"bearerAuth": []}] and "401" in op["responses"], path
    assert {"/debug/kv_digests", "/debug/check_integrity", "/debug/elastic", "/v1/cluster"} <= set(doc["paths"])
    decision = _resolve(doc, doc["paths"]["/debug/elastic"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["$ref"])
    assert decision["discriminator"]["propertyName"] == "kind"
    assert {ref.rsplit("/", 1)[1] for ref in decision["discriminator"]["mapping"].values()} == {
        "MoveCores", "ChangeRole", "SetStepTarget"}


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [x for v in node.values() for x in _refs(v)]
    if isinstance(node, list):
        return [x for v in node for x in _refs(v)]
    return []


# ---- the debug routes (--enable-debug-endpoints) -------------------------------------------------------


class ElasticFake(FakeClient):
    """Records the Configure messages of /debug/elastic's decisions; answers /debug/check_integrity."""

    def __init__(self):
        super().__init__()
        self.configured: list = []
        self.tracker = type("Tracker", (), {"instances": {}})()
        self.elastic = None

    def configure(self, worker_id, msg):
        self.configured.append((worker_id, msg))

    async def check_integrity(self):
        return {"w0": ""}


@pytest.mark.parametrize("body,param", [
    ({"kind": "Bogus"}, "kind"), ({"worker_id": "w0"}, "kind"), ({"kind": "ChangeRole", "worker_id": "w0"}, "role"),
    ({"kind": "ChangeRole", "worker_id": "w0", "role": "boss"}, "role"),
    ({"kind": "SetStepTarget", "worker_id": "w0", "step_target_s": -1}, "step_target_s"),
    ({"kind": "MoveCores", "src": "a", "dst": "b", "src_cores": [-1], "dst_cores": []}, "src_cores[0]"),
    ({"kind": "SetStepTarget", "worker_id": "w0", "step_target_s": None, "extra": 1}, "extra"),
])
def test_debug_elastic_refuses_bad_decisions_naming_the_field(body, param):
    fake = ElasticFake()
    with TestClient(create_app(fake, MODEL, CharTokenizer, enable_debug=True)) as c:
        resp = c.post("/debug/elastic", json=body)
    assert resp.status_code == 400 and r.ErrorResponse.model_validate(resp.json()).error.param == param, resp.text
    assert fake.configured == []


def test_debug_routes_answer_their_documented_bodies():
    fake = ElasticFake()
    with TestClient(create_app(fake, MODEL, CharTokenizer, enable_debug=True)) as c:
        resp = c.post("/debug/elastic", json={"kind": "ChangeRole", "worker_id": "w0", "role": "decode"})
        assert resp.status_code == 200 and r.ElasticResult.model_validate(resp.json()).decision == "operator"
        resp = c.post("/debug/elastic", json={"kind": "SetStepTarget", "worker_id": "w0", "step_target_s": None,
                                              "reason": "test"})
        assert resp.status_code == 200 and resp.json()["decision"] == "test"
        assert r.IntegrityReport.model_validate(c.post("/debug/check_integrity").json()).workers == {"w0": ""}
        assert c.post("/debug/elastic", content=b"[1]").status_code == 400
    assert [(w, m.role, m.step_target_s) for w, m in fake.configured] == [("w0", "decode", None), ("w0", None, None)]


def test_bad_query_parameter_is_400_naming_it():
    with TestClient(create_app(FakeClient(), MODEL, CharTokenizer)) as c:
        err = r.ErrorResponse.model_validate(c.get("/v1/cluster", params={"history_since": "soon"}).json()).error
    assert err.param == "history_since" and err.type == "invalid_request_error"
