"""`python -m train.report RUN_DIR`: readable PNGs and a summary that matches metrics.jsonl."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg

from tests.helpers import REPO
from train.report import load_records, main, resumes


def _write_metrics(run_dir: Path) -> None:
    lines = []
    for step in range(1, 31):
        rec = {"step": step, "loss": 6.0 - 0.1 * step, "lr": 1e-4 * min(step, 10), "grad_norm": 1.0,
               "tokens": 512 * step, "tokens_per_s": 4000.0 if step > 1 else 100.0, "step_time_s": 0.128,
               "data_wait_s": 0.0128, "data_wait_frac": 0.1, "mem_peak_gb": 1.5 + step / 100,
               "sys/host_rss_gb": 2.0, "mfu": 0.25}
        if step == 17:
            rec["loss"] = None  # metrics.jsonl stores a NaN loss as null
        lines.append(json.dumps(rec))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "eval_loss": 5.0 - step / 100, "eval_ppl": 100.0}))
    lines.insert(5, json.dumps({"step": 5, "loss": 99.0}))  # replaced by the later (resumed) record of step 5
    lines += [json.dumps({"step": 20, "checkpoint_time_s": 0.5}), json.dumps({"step": 20, "export_time_s": 2.0}),
              json.dumps({"step": 20, "resumed_from": "step_00000020"})]  # one step, three kinds: all kept
    lines.append('{"step": 31, "loss": 2.')  # torn last line of a crashed run
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_writes_plots_and_summary(tmp_path):
    _write_metrics(tmp_path)
    records = load_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert next(r for r in records if r["step"] == 5 and "loss" in r)["loss"] == 99.0  # last wins
    assert resumes(records) == [(20, "step_00000020")]

    proc = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "line 38 skipped" in proc.stderr
    out = tmp_path / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["data_wait.png", "loss.png", "lr.png", "memory.png", "throughput.png"]
    for name in pngs:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500, (name, img.shape)
        assert img[..., :3].std() > 0.01  # not a blank canvas
    assert not list(out.glob(".tmp-*"))

    summary = (out / "summary.md").read_text()
    assert "| steps logged | 1 .. 30 (36 records) |" in summary
    assert "| final loss | 3.0000 (step 30) |" in summary
    assert "| final eval loss | 4.7000 (step 30), ppl 100.00 |" in summary
    assert "| start -> end | train loss 5.9000 (step 1) -> eval loss 4.7000 (step 30): -1.20 nats |" in summary
    assert "| resumed | at step 20 from step_00000020 |" in summary
    assert "| checkpoint time (mean) | 0.50 s |" in summary and "| export time (mean) | 2.00 s |" in summary
    assert "| non-finite losses | 1 (first at step 17) |" in summary
    assert "| tokens/s (median, first window excluded) | 4,000 |" in summary
    assert "| data wait share (mean) | 10.0% |" in summary
    assert "| MFU (median) | 25.0% |" in summary
    assert "| mem_peak_gb (max) | 1.80 GiB |" in summary
    for name in pngs:
        assert f"({name})" in summary


def test_report_names_a_missing_metrics_file(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
