"""End to end, the HTTP API as a contract on a real cluster (one colocated worker, the default model) with
an API key: OpenAI's semantics through the official client, a schema-driven fuzz of the served OpenAPI
document (schemathesis, every check on), the security policy, and no prompt in any process's log."""
from __future__ import annotations

import os
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from cluster_helpers import MODEL, local_cluster, log_path, require_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY = f"e2e-{secrets.token_hex(12)}"
CAP = 1  # the server's max_tokens cap: bounds the work of every fuzzed request (no long generations)
FUZZ_EXAMPLES = 4  # fuzzing-phase examples per operation (the coverage phase, most of the cost, adds its own)
MARKER = f"SECRET-PROMPT-{secrets.token_hex(6)}"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def url():
    require_model()
    # OpenMP threads that sleep rather than spin between parallel regions: the fuzz is hundreds of one-token
    # requests, each a few short forward passes, and spinning threads made each one cost ~0.4 CPU-s (7x more,
    # and 8x the wall time on a loaded 2-core machine) while starving the frontend and the fuzzer.
    env = {**os.environ, "PDSERVE_API_KEY": KEY, "OMP_WAIT_POLICY": "PASSIVE"}
    # A generous liveness timeout: a fuzzed batch (n up to 128) on a busy 2-core machine is not a dead worker.
    with local_cluster("--colocated", "1", "--max-tokens-cap", str(CAP), "--worker-timeout", "120",
                       env=env) as (base, proc):
        _client(base).completions.create(model=MODEL, prompt="warm up", max_tokens=1)
        yield base


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=120, max_retries=0)


def test_openai_semantics(url):
    c = _client(url)
    for stream in (False, True):  # one failing prompt of a batch: a clear 400, never a 500
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt=["Hello", ""], stream=stream)
        assert e.value.body["param"] == "prompt"
    r = c.completions.create(model=MODEL, prompt="The capital of France is", n=None, stream=None, echo=None,
                             logprobs=None, max_tokens=None, temperature=None, stop=None, seed=None)
    assert len(r.choices) == 1 and r.usage.completion_tokens == min(16, CAP)  # the default, under the cap
    r = c.completions.create(model=MODEL, prompt="Hi", max_tokens=1.0, temperature=0)  # an integral float
    assert r.usage.completion_tokens == 1
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert chat.usage.completion_tokens <= CAP and chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=CAP + 1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="Hi")
    finished, texts = set(), {}
    for chunk in c.completions.create(model=MODEL, prompt=["Hello", "World"], n=2, stream=True, temperature=0):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2, 3} and all(texts.values())
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: same prompt, same text


def test_schema_fuzz(url, tmp_path):
    """schemathesis with all its checks (status codes and content types documented, bodies and stream events
    conforming to the schemas, no 5xx, invalid data refused, valid data accepted, auth enforced, ...)
    against the served document, every operation but POST /debug/elastic (its valid decisions would park
    workers and move their cores: test_e2e_auto.py drives it); then the cluster still serves the official
    client."""
    out = tmp_path / "schemathesis.txt"
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml"), "run",
            f"{url}/openapi.json", "--header", f"Authorization: Bearer {KEY}", "--checks", "all",
            "--phases", "examples,coverage,fuzzing", "--max-examples", str(FUZZ_EXAMPLES), "--seed", "20261207",
            "--request-timeout", "60", "--workers", "1", "--no-shrink", "--suppress-health-check", "too_slow",
            "--exclude-path", "/debug/elastic",
            "--report", "ndjson", "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cluster = _cluster_processes(url)
    cluster_cpu = sum(_cpu_s(p) for p in cluster)
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600, cwd=tmp_path)
    text = out.read_text()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"schemathesis: {time.monotonic() - start:.0f} s, its own CPU "
          f"{used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.0f} s, the cluster's CPU "
          f"{sum(_cpu_s(p) for p in cluster) - cluster_cpu:.0f} s\n{text[-3000:]}")
    assert proc.returncode == 0, text[-12000:]
    assert "No issues found" in text, text[-3000:]
    r = _client(url).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=CAP,
                                        temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def test_security_policy(url):
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    assert _client(url).models.list().data[0].id == MODEL
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("POST", "/debug/kv_digests"), ("POST", "/v1/completions"), ("GET", "/v1/cluster"),
                         ("POST", "/debug/elastic"), ("POST", "/debug/check_integrity")):
        resp = httpx.request(method, f"{url}{path}", json={}, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
    public = httpx.get(f"{url}/health", timeout=30)
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    detailed = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert detailed["workers"][0]["pid"] > 0
    page = httpx.get(f"{url}/dashboard", timeout=30)  # the page asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    cluster = httpx.get(f"{url}/v1/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert cluster.status_code == 200 and cluster.json()["mode"] == "colocated"
    # pdserve up read /v1/cluster with the key for its start-up summary, and printed no key
    log = log_path(url).read_text(errors="replace")
    assert "colocated: 1 both" in log and "Bearer $PDSERVE_API_KEY" in log and KEY not in log
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    # The key is on no command line (ps shows those to every user); the frontend has it in its environment.
    frontend = next(p for p in _cluster_processes(url) if "pdserve.server.main" in " ".join(p.cmdline()))
    for p in _cluster_processes(url):
        assert KEY not in " ".join(p.cmdline()), p.cmdline()
    assert frontend.environ().get("PDSERVE_API_KEY") == KEY


def test_no_prompt_in_the_logs(url):
    c = _client(url)
    c.completions.create(model=MODEL, prompt=MARKER, max_tokens=1)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": MARKER}], max_tokens=1)
    for bad in ({"prompt": MARKER * 3000}, {"prompt": MARKER, "extra_body": {"bogus": MARKER}},
                {"prompt": [MARKER, ""]}):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, max_tokens=1, **bad)
    time.sleep(1.0)  # let the processes' log lines reach the file
    assert MARKER not in log_path(url).read_text(errors="replace")


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _cluster_processes(url: str) -> list[psutil.Process]:
    port = int(url.rsplit(":", 1)[1])
    up = next(p for p in psutil.process_iter(["cmdline"]) if "up" in (p.info["cmdline"] or [])
              and str(port) in (p.info["cmdline"] or []))
    return [up, *up.children(recursive=True)]
