"""`pdserve bench` against pdserve's own cluster: `pdserve up` (1 prefill + 1 decode worker) as a real
process, then 8 requests of 64 tokens in / 16 out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cluster.local import free_port, wait_healthy

STARTUP_TIMEOUT_S = 900
BENCH_TIMEOUT_S = 600


def _pdserve() -> list[str]:
    exe = Path(sys.executable).with_name("pdserve")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from pdserve.cli import main; sys.exit(main())"]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    try:
        wait_healthy(url, proc, STARTUP_TIMEOUT_S)
    except RuntimeError as e:
        pytest.fail(f"pdserve up: {e}:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("cluster") / "pdserve_up.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*_pdserve(), "up", "--port", str(port), "--prefill", "1", "--decode", "1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log)
        yield url
    finally:
        _stop(proc)


@pytest.mark.slow
def test_bench_against_local_cluster(cluster_url: str, tmp_path: Path):
    out = tmp_path / "result.json"
    plots = tmp_path / "plots"
    cmd = [
        *_pdserve(),
        "bench",
        "--base-url",
        cluster_url,
        "--dataset",
        "random",
        "--num-requests",
        "8",
        "--input-len",
        "64",
        "--output-len",
        "16",
        "--rate",
        "inf",
        "--slo-ttft",
        "60",
        "--slo-tpot",
        "10",
        "--request-timeout",
        "300",
        "--max-duration",
        "500",
        "--no-progress",
        "--out",
        str(out),
        "--plot-dir",
        str(plots),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TTFT" in proc.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_output_tokens"] == 8 * 16  # ignore_eos: every request runs to max_tokens
    assert all(r["input_len"] == 64 and r["output_tokens"] == 16 for r in result["requests"])
    assert all(len(r["itl_s"]) >= 1 for r in result["requests"])
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert result[key]["p50"] > 0
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert (plots / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
