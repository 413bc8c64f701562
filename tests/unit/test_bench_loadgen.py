"""The load generator against a tiny in-process fake OpenAI-compatible SSE server on 127.0.0.1.

The fake server stands in for an external endpoint (pdserve, vLLM, llama.cpp). Its behaviour is chosen
by the request's model name:

- ``ok``: streams ``max_tokens`` one-token chunks, then a usage chunk and ``[DONE]``;
- ``mixed``: by arrival order k = 1, 2, ...: k % 4 == 2 answers HTTP 500, k % 4 == 3 drops the
  connection mid-stream, the others behave like ``ok``;
- ``hang``: sends the response headers, then nothing;
- ``garbage``: a malformed event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from pathlib import Path
from typing import Self

import pytest

from pdserve.bench import cli
from pdserve.bench.loadgen import EndpointConfig, run_load
from pdserve.bench.workloads import PromptBuilder, WorkloadConfig, build_shapes

TOKEN_DELAY_S = 0.002


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self._counter = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers = {}
            while line := (await reader.readline()).decode().strip():
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = request_line.split(" ", 2)
            if method == "GET" and path == "/v1/models":
                await self._respond_json(writer, 200, {"object": "list", "data": [{"id": "ok"}]})
                return
            payload = json.loads(body)
            self.payloads.append(payload)
            self.headers.append(headers)
            await self._completion(writer, payload)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (timeout tests); nothing to answer
        finally:
            writer.close()

    async def _completion(self, writer: asyncio.StreamWriter, payload: dict) -> None:
        model = payload["model"]
        k = next(self._counter)
        if model == "mixed" and k % 4 == 2:
            await self._respond_json(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        if model == "hang":
            await asyncio.sleep(30)
            return
        if model == "garbage":
            await self._chunk(writer, 'data: {"choices": "not a list"}\n\ndata: {not json\n\n')
            writer.write(b"0\r\n\r\n")
            return
        n = payload["max_tokens"]
        for i in range(n):
            if model == "mixed" and k % 4 == 3 and i == 2:
                return  # drop the connection mid-stream, no terminating chunk
            finish = "length" if i == n - 1 else None
            event = {
                "object": "text_completion",
                "choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}],
            }
            await self._chunk(writer, f"data: {json.dumps(event)}\n\n")
            await asyncio.sleep(TOKEN_DELAY_S)
        usage = {"prompt_tokens": len(payload["prompt"]), "completion_tokens": n, "total_tokens": n}
        await self._chunk(writer, f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
        await self._chunk(writer, "data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, text: str) -> None:
        data = text.encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    async def _respond_json(writer: asyncio.StreamWriter, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        reason = "OK" if status == 200 else "Internal Server Error"
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def test_run_load_records_token_times_and_payload(server: FakeOpenAIServer):
    config = WorkloadConfig(num_requests=3, input_len=12, output_len=5)
    shapes = build_shapes(config)
    endpoint = EndpointConfig(server.url, "ok", api_key="sekrit", request_timeout_s=10)
    result = run_load(shapes, PromptBuilder(config).prompt_token_ids, endpoint, show_progress=False)
    assert result.num_not_sent == 0
    assert [r.index for r in result.records] == [0, 1, 2]
    for record in result.records:
        assert record.error is None, record.error_detail
        assert record.output_tokens == 5
        assert len(record.chunk_times_s) == 5
        assert record.send_s < record.chunk_times_s[0]
        assert record.chunk_times_s == sorted(record.chunk_times_s)
        assert record.end_s >= record.chunk_times_s[-1]
    payload = server.payloads[0]
    assert payload["stream"] is True and payload["ignore_eos"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["temperature"] == 0 and payload["max_tokens"] == 5
    assert len(payload["prompt"]) == 12 and all(isinstance(t, int) for t in payload["prompt"])
    assert server.headers[0]["authorization"] == "Bearer sekrit"


def test_cli_counts_errors_and_writes_json_and_plots(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "run.json"
    rc = cli.main(
        [
            "--base-url",
            server.url,
            "--model",
            "mixed",
            "--num-requests",
            "8",
            "--input-len",
            "16",
            "--output-len",
            "6",
            "--concurrency",
            "2",
            "--slo-ttft",
            "5",
            "--slo-tpot",
            "5",
            "--out",
            str(out),
            "--plot-dir",
            str(tmp_path / "plots"),
            "--no-progress",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_sent"] == 8
    assert (result["completed"], result["failed"]) == (4, 4)
    assert result["errors"] == {"HTTP 500": 2, "dropped stream": 2}
    assert result["slo_attainment"] == pytest.approx(0.5)
    assert result["goodput"] == pytest.approx(4 / result["duration_s"])
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(result[key]) >= {"mean", "p50", "p90", "p99"}
        assert result[key]["mean"] > 0
    assert result["workload"]["dataset"] == "random" and result["workload"]["concurrency"] == 2
    assert result["length_scale"] == 1.0
    ok = [r for r in result["requests"] if r["error"] is None]
    assert len(ok) == 4 and all(len(r["itl_s"]) == 5 for r in ok)
    png = tmp_path / "plots" / "latency_cdf.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rate_sweep_and_compare(server: FakeOpenAIServer, tmp_path: Path, capsys):
    common = [
        "--base-url",
        server.url,
        "--num-requests",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--slo-ttft",
        "5",
        "--slo-tpot",
        "5",
        "--no-progress",
    ]
    sweep = tmp_path / "sweep.json"
    assert (
        cli.main(
            [
                *common,
                "--model",
                "ok",
                "--rates",
                "50,100",
                "--out",
                str(sweep),
                "--plot-dir",
                str(tmp_path / "sweep_plots"),
            ]
        )
        == 0
    )
    result = json.loads(sweep.read_text())
    assert result["kind"] == "sweep" and result["rates"] == [50, 100]
    assert [run["rate"] for run in result["runs"]] == [50, 100]
    assert all(run["completed"] == 4 for run in result["runs"])
    assert result["max_rate_meeting_attainment"] == 100
    for name in ("latency_cdf.png", "attainment_vs_rate.png", "goodput_vs_rate.png"):
        assert (tmp_path / "sweep_plots" / name).stat().st_size > 0

    other = tmp_path / "other.json"
    assert (
        cli.main([*common, "--model", "mixed", "--rates", "50,100", "--label", "flaky", "--out", str(other)])
        == 0
    )
    assert json.loads(other.read_text())["max_rate_meeting_attainment"] is None
    capsys.readouterr()
    assert cli.main(["compare", str(sweep), str(other), "--out-dir", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "max rate meeting SLO" in table and "flaky" in table
    for name in ("latency_cdf.png", "attainment_vs_rate.png", "goodput_vs_rate.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0


def test_timeouts_are_counted_not_raised(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "hang.json"
    rc = cli.main(
        [
            "--base-url",
            server.url,
            "--model",
            "hang",
            "--num-requests",
            "2",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--request-timeout",
            "0.3",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 1  # nothing completed
    result = json.loads(out.read_text())
    assert result["errors"] == {"timeout": 2}


def test_max_duration_bounds_the_run(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "bounded.json"
    rc = cli.main(
        [
            "--base-url",
            server.url,
            "--model",
            "hang",
            "--num-requests",
            "5",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--rate",
            "10",
            "--max-duration",
            "0.25",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    result = json.loads(out.read_text())
    assert result["num_not_sent"] >= 1  # arrivals past 0.25 s are never sent
    assert result["errors"] == {"max duration": result["num_sent"]}
    assert result["duration_s"] < 2.0


def test_connection_refused_is_counted(tmp_path: Path):
    out = tmp_path / "refused.json"
    rc = cli.main(
        [
            "--base-url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--num-requests",
            "2",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    assert json.loads(out.read_text())["errors"] == {"connect error": 2}


def test_model_discovery(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "disc.json"
    assert (
        cli.main(
            [
                "--base-url",
                server.url + "/v1",
                "--num-requests",
                "1",
                "--input-len",
                "4",
                "--output-len",
                "2",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["model"] == "ok"


@pytest.mark.parametrize(
    "argv",
    [
        ["--base-url", "http://x", "--dataset", "mooncake:/does/not/exist.jsonl"],
        ["--base-url", "http://x", "--dataset", "sharegpt"],
        ["--base-url", "http://x", "--time-scale", "2"],
        ["--base-url", "http://x", "--dataset", "mix"],
        ["--base-url", "http://x", "--rate", "1", "--concurrency", "2"],
        ["--base-url", "http://x", "--input-len-range", "10,5"],
        ["--model", "m"],
        ["compare", "/does/not/exist.json"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv: list[str], capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_malformed_events_are_counted(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "garbage.json"
    argv = ["--base-url", server.url, "--model", "garbage", "--num-requests", "2", "--input-len", "4"]
    assert cli.main([*argv, "--output-len", "2", "--no-progress", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["errors"] == {"bad response": 2}


def test_warmup_requests_are_sent_but_not_recorded(server: FakeOpenAIServer, tmp_path: Path):
    out = tmp_path / "warm.json"
    before = next(server._counter)
    rc = cli.main(["--base-url", server.url, "--model", "ok", "--num-requests", "3", "--input-len", "4",
                   "--output-len", "2", "--concurrency", "1", "--warmup", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_sent"] == 3 and result["completed"] == 3
    assert next(server._counter) - before == 1 + 2 + 3  # this call's own draw, the warm-up, the run
