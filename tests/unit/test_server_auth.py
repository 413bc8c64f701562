"""The HTTP surface's security policy, over real HTTP to the app: what needs the key, what /health tells
whom, where the key may come from, and that prompts stay out of the logs."""
from __future__ import annotations

import argparse
import logging

import pytest
from fastapi.testclient import TestClient

from pdserve.cluster.cli import add_up_args
from pdserve.server.app import create_app
from pdserve.server.main import add_frontend_args, frontend_api_argv, frontend_env
from pdserve.server.auth import API_KEY_ENV, load_api_key
from test_server_api import MODEL, CharTokenizer, FakeClient

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class DetailedHealthClient(FakeClient):
    def health(self):
        return {"status": "ok" if self.serving else "unavailable", "mode": "colocated", "num_inflight": 0,
                "workers": [{"worker_id": "w0", "role": "both", "address": "tcp://10.0.0.7:5555", "pid": 4242,
                             "host": "gpu-host-7", "alive": True}]}


@pytest.fixture
def secured():
    with TestClient(create_app(DetailedHealthClient(), MODEL, CharTokenizer, api_key=KEY, enable_debug=True)) as c:
        yield c


GUARDED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
           ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/debug/kv_digests"),
           ("POST", "/debug/check_integrity"), ("POST", "/debug/elastic"), ("GET", "/v1/cluster"),
           ("GET", "/no/such/route"), ("GET", "/dashboardx"), ("GET", "/health/x")]


@pytest.mark.parametrize("method,path", GUARDED)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"bearer {KEY}x"}])
def test_every_route_but_health_needs_the_key(secured, method, path, headers):
    resp = secured.request(method, path, headers=headers, json={})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/models", 200), ("GET", "/metrics", 200), ("GET", "/openapi.json", 200), ("GET", "/docs", 200),
    ("GET", "/no/such/route", 404), ("POST", "/debug/kv_digests", 400)])
def test_with_the_key(secured, method, path, status):
    assert secured.request(method, path, headers=AUTH, json={}).status_code == status


def test_the_dashboard_page_is_open_and_its_data_is_not(secured):
    """The page and its assets hold no data: a browser loads them without a key, and the page asks for the key
    when /v1/cluster answers 401 (docs/monitoring.md)."""
    page = secured.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/cluster" in secured.get("/dashboard/dashboard.js").text
    assert secured.get("/dashboard/dashboard.css").status_code == 200
    assert secured.get("/dashboard/secrets.json").status_code == 404  # only the assets
    assert secured.get("/v1/cluster").status_code == 401
    assert secured.get("/dashboard/../v1/cluster").status_code in (401, 404)


def test_metrics_is_prometheus_text(secured):
    resp = secured.get("/metrics", headers=AUTH)
    assert resp.headers["content-type"].startswith("text/plain") and "vllm:" in resp.text


def test_health_tells_status_to_all_and_details_only_with_the_key(secured):
    public = secured.get("/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    assert "gpu-host-7" not in public.text and "4242" not in public.text and "10.0.0.7" not in public.text
    assert secured.get("/health", headers={"Authorization": "Bearer nope"}).json() == {"status": "ok"}
    detailed = secured.get("/health", headers=AUTH).json()
    assert detailed["workers"][0]["host"] == "gpu-host-7" and detailed["workers"][0]["pid"] == 4242


def test_health_status_code_without_the_key():
    fake = DetailedHealthClient()
    fake.serving = False
    with TestClient(create_app(fake, MODEL, CharTokenizer, api_key=KEY)) as c:
        resp = c.get("/health")
    assert resp.status_code == 503 and resp.json() == {"status": "unavailable"}


def test_without_a_key_everything_is_open_but_debug_is_off():
    with TestClient(create_app(DetailedHealthClient(), MODEL, CharTokenizer)) as c:
        assert c.get("/health").json()["workers"][0]["pid"] == 4242
        assert c.get("/metrics").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.post("/debug/kv_digests", json={"prompt_token_ids": [1, 2]}).status_code == 404
        assert "/debug/kv_digests" not in c.get("/openapi.json").json()["paths"]


# ---- where the key comes from ---------------------------------------------------------------------------


def test_key_from_environment_or_file(tmp_path):
    assert load_api_key(None, {}) is None
    assert load_api_key(None, {API_KEY_ENV: "from-env"}) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\nignored second line\n")
    assert load_api_key(str(f), {API_KEY_ENV: "from-env"}) == "from-file"
    for bad_env in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            load_api_key(None, {API_KEY_ENV: bad_env})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_api_key(str(tmp_path / "empty"), {})
    with pytest.raises(ValueError, match="cannot read"):
        load_api_key(str(tmp_path / "missing"), {})


@pytest.mark.parametrize("add_args,required", [(add_frontend_args, ["--workers", "tcp://x:1"]), (add_up_args, [])])
def test_no_key_on_any_command_line(add_args, required, capsys):
    parser = argparse.ArgumentParser()
    add_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--api-key", KEY])
    err = capsys.readouterr().err
    assert "--api-key is not accepted" in err and KEY not in err
    args = parser.parse_args([*required, "--api-key-file", "/k", "--max-tokens-cap", "64"])
    assert args.api_key_file == "/k" and args.max_tokens_cap == 64
    assert API_KEY_ENV in parser.format_help().replace("\n", " ").replace("  ", " ")


def test_up_hands_the_key_to_its_frontend_through_the_environment(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    f = tmp_path / "key"
    f.write_text(KEY)
    args = parser.parse_args(["--api-key-file", str(f), "--max-tokens-cap", "64"])
    argv = frontend_api_argv(args)
    assert KEY not in " ".join(argv) and argv == ["--max-tokens-cap", "64"]
    assert frontend_env(args, {}) == {API_KEY_ENV: KEY}
    assert frontend_env(args, {API_KEY_ENV: "other"}) == {API_KEY_ENV: KEY}  # the file wins
    assert frontend_env(parser.parse_args([]), {API_KEY_ENV: " from-env "}) == {API_KEY_ENV: "from-env"}
    assert frontend_env(parser.parse_args([]), {}) == {}  # no key


# ---- prompts and bodies stay out of the logs ------------------------------------------------------------


def test_no_prompt_or_body_in_the_logs(caplog):
    class Buggy(FakeClient):
        async def generate(self, prompt_ids, params, request_id=None):
            if "BUG" in "".join(chr(t) for t in prompt_ids):
                raise RuntimeError("".join(chr(t) for t in prompt_ids))
            async for event in super().generate(prompt_ids, params, request_id):
                yield event

    caplog.set_level(logging.INFO)
    marker = "SECRET-PROMPT-7f3a"
    with TestClient(create_app(Buggy(), MODEL, CharTokenizer)) as c:
        c.post("/v1/completions", json={"model": MODEL, "prompt": marker, "max_tokens": 2})
        c.post("/v1/completions", json={"model": MODEL, "prompt": marker, "max_tokens": 2, "bogus": marker})
        c.post("/v1/completions", json={"model": MODEL, "prompt": marker * 10, "max_tokens": 2})  # too long
        c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": marker}]})
        resp = c.post("/v1/completions", json={"model": MODEL, "prompt": f"BUG {marker}", "max_tokens": 2})
        assert resp.status_code == 500 and marker not in resp.text
        assert resp.json()["error"]["type"] == "internal_error"
    assert "RuntimeError" in caplog.text  # the bug is logged, without what the client sent
    assert marker not in caplog.text
