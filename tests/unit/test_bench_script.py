from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pd_vs_colocated.py"


def test_pd_vs_colocated_dry_run_prints_the_plan(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--out-dir",
            str(tmp_path),
            "--vllm-url",
            "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "up --port" in out and "--colocated 1" in out and "--prefill 1 --decode 1" in out
    assert out.count("--dataset mix") == 3 and out.count("--dataset mooncake:") == 3  # 2 systems + vLLM
    assert "--length-scale" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
