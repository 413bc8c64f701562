"""benchmarks/sim_published.py runs end to end on its quickest source and writes its figures."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_published_validation_runs_and_reports_each_figure(tmp_path):
    out = tmp_path / "published.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_published.py"), "--sources", "vllm,deepseek",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["held_out"] == "nim" and set(data["sources"]) >= {"trtllm", "vllm", "nim", "deepseek"}
    rows = data["rows"]
    assert {r["source"] for r in rows} == {"vllm", "deepseek"} and len(rows) == 4
    for r in rows:
        assert r["published"] > 0 and math.isfinite(r["error"]) and math.isfinite(r["roofline_error"])
    assert "MAPE" in proc.stdout and "roofline only" in proc.stdout


def test_unknown_source_is_a_clear_error():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_published.py"), "--sources", "nope"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "unknown sources" in proc.stderr
