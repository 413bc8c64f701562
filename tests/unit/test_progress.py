"""Start-up stages (pdserve.progress) as ``pdserve up`` follows them, its summary screen, and progress bars
that stay out of logs."""
from __future__ import annotations

import io
import logging
import sys

from pdserve.cluster.startup import StartupProgress, summary
from pdserve.progress import PROGRESS_FILE_ENV, bar, read_stages, report_stage


def test_stages_go_to_the_file_named_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    report_stage("kernels", ok=True)  # no variable: nothing written anywhere
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    report_stage("kernels", ok=True, seconds=1.5)
    report_stage("weights", seconds=2.0)
    with open(path, "a") as f:
        f.write('{"stage": "rea')  # a line being written
    assert [(e["stage"], e.get("ok")) for e in read_stages(path)] == [("kernels", True), ("weights", None)]
    assert read_stages(tmp_path / "missing.jsonl") == []


def test_startup_progress_logs_each_stage_once_off_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "p0.jsonl"))
    progress = StartupProgress()
    progress.add_worker("prefill-0", tmp_path / "p0.jsonl", tmp_path / "r0.json")
    progress.add_worker("decode-1", tmp_path / "p1.jsonl", tmp_path / "r1.json")  # a GPU worker: no kernels stage
    with caplog.at_level(logging.INFO, logger="pdserve.cluster.startup"):
        progress.poll()
        report_stage("kernels", ok=True, seconds=0.5)
        report_stage("weights", seconds=3.0)
        progress.poll()
        progress.poll()
        (tmp_path / "r0.json").write_text("{}")
        (tmp_path / "r1.json").write_text("{}")
        progress.frontend_ready()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["prefill-0: CPU kernels ready (0.5 s)", "prefill-0: weights loaded (3.0 s)", "prefill-0: ready",
                     "decode-1: ready", "frontend: serving"]
    assert all(len(w.done) == 3 for w in progress.workers)


def test_summary_screen():
    status = {"mode": "disaggregated", "cost": {"price_per_hour": 0.08}, "workers": [
        {"worker_id": "prefill-0", "role": "prefill", "device": "cpu", "num_cores": 1, "num_blocks": 273,
         "price_per_hour": 0.04},
        {"worker_id": "decode-1", "role": "decode", "device": "cuda", "num_cores": 0, "num_blocks": 9000,
         "price_per_hour": 2.99}]}
    text = summary("http://127.0.0.1:8000", status, "smollm2-135m", api_key="secret")
    assert "disaggregated: 1 prefill, 1 decode" in text and "cpu, 1 core " in text and "$2.990/h" in text
    assert "http://127.0.0.1:8000/dashboard" in text and "curl http://127.0.0.1:8000/v1/completions" in text
    assert "secret" not in text and "$PDSERVE_API_KEY" in text
    assert "pdserve is ready at http://127.0.0.1:8000" in summary("http://127.0.0.1:8000", None, "m")
    assert "planned" not in text
    status["cost"]["planned"] = {"cost_per_million_tokens": {"input": 0.036, "cached_input": 0.0036, "output": 0.057,
                                                             "blended": 0.039},
                                 "price_per_hour": 0.08, "goodput_rps": 4.4, "planned_by": "pdserve plan"}
    text = summary("http://127.0.0.1:8000", status, "smollm2-135m")
    assert "planned    input $0.0360, output $0.0570 per million tokens at 4.40 req/s (pdserve plan)" in text


def test_summary_screen_in_mode_auto():
    """Mode auto: the controller parked the prefill worker and gave its cores to the decode worker."""
    status = {"mode": "auto", "cost": {"price_per_hour": 0.08}, "elastic": {"objectives": {"ttft_s": 2.0,
                                                                                           "tpot_s": 0.1}},
              "workers": [
                  {"worker_id": "prefill-0", "role": "prefill", "device": "cpu", "cores": [], "is_parked": True,
                   "num_cores": 0, "num_blocks": 273, "price_per_hour": 0.0},
                  {"worker_id": "decode-1", "role": "decode", "device": "cpu", "cores": [0, 1, 2, 5],
                   "is_parked": False, "num_cores": 4, "num_blocks": 273, "price_per_hour": 0.08}]}
    lines = summary("http://127.0.0.1:8000", status, "smollm2-135m").splitlines()
    assert "auto: 1 prefill, 1 decode" in next(x for x in lines if x.startswith("  mode "))
    assert "cpu, parked" in next(x for x in lines if "prefill-0" in x)
    assert "cpu, cores 0-2,5" in next(x for x in lines if "decode-1" in x)
    assert "TTFT 2.0 s, TPOT 0.1 s: the elastic controller" in next(x for x in lines if "objectives" in x)


def test_bars_draw_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    b = bar(10, "quiet")
    assert b.disable
    b.update(3)
    b.close()
    assert log.getvalue() == ""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    b = bar(10, "shown")
    assert not b.disable
    b.update(3)
    b.close()
    assert "shown" in term.getvalue()
