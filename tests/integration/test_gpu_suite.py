"""bench/gpu_suite.py's orchestration on CPU: a case that hangs is killed with its whole process
group and recorded as `timeout`, a failing one leaves one line in the JSON and its log beside it,
and the other cases' figures are written; the suite refuses to "measure" a GPU on CPU."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)

OK = """
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
(run / "checkpoints" / "step_1").mkdir(parents=True)
(run / "checkpoints" / "step_1" / "big.bin").write_bytes(b"0" * 1000)
rows = [{"step": s, "loss": 5.0 - s, "tokens_per_s": 100.0 * s, "step_time_s": 0.1, "mem_peak_gb": 1.5, "mfu": 0.4}
        for s in (1, 2, 3)]
(run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
"""
HANG = """
import os, pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path(sys.argv[1], "pids").write_text(f"{os.getpgid(0)} {child.pid}")
time.sleep(600)
"""
FAIL = """
import sys
print("Traceback (most recent call last):\\n" + "  frame\\n" * 200)
print("RuntimeError: CUDA out of memory " + "x" * 5000)
sys.exit(1)
"""


def _live(pids: set[int] | None = None, pgid: int | None = None) -> list[int]:
    """Processes (not zombies) with one of `pids`, or in process group `pgid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if fields[0] != "Z" and ((pids and pid in pids) or (pgid is not None and int(fields[2]) == pgid)):
            out.append(pid)
    return out


def test_hung_and_failed_cases_leave_the_other_figures(tmp_path):
    py = sys.executable
    chosen = [suite.Case("first ok", [], command=[py, "-c", OK, "{run_dir}"]),
              suite.Case("hangs", [], command=[py, "-c", HANG, "{run_dir}"], timeout_s=4),
              suite.Case("fails", [], command=[py, "-c", FAIL, "{run_dir}"]),
              suite.Case("needs a gpu", [], needs="cuda"),
              suite.Case("too dear", [], est_s=10_000, command=[py, "-c", OK, "{run_dir}"]),
              suite.Case("last ok", [], command=[py, "-c", OK, "{run_dir}"])]
    args = argparse.Namespace(out=tmp_path, smoke=True, budget_s=600, case_timeout=60, steps=3, warmup=1)
    suite.run_suite(chosen, args, env={"python": "test"})

    doc = json.loads((tmp_path / "results.json").read_text())
    cases = doc["cases"]
    assert [cases[n]["status"] for n in cases] == ["ok", "timeout", "failed", "skipped", "skipped", "ok"]
    for name in ("first ok", "last ok"):
        assert cases[name]["tokens_per_s"] == 250.0 and cases[name]["mem_peak_gb"] == 1.5  # the median of steps 2 and 3
        assert not (tmp_path / "runs" / name.replace(" ", "_") / "checkpoints").exists()  # deleted once summarized
    assert "budget" in cases["too dear"]["why"] and cases["needs a gpu"]["why"] == "needs CUDA"
    error = cases["fails"]["error"]
    assert error.startswith("RuntimeError: CUDA out of memory") and "\n" not in error and len(error) <= 300
    assert "frame" in (tmp_path / cases["fails"]["log"]).read_text()  # the full log beside the results
    pgid, grandchild = map(int, (tmp_path / "runs" / "hangs" / "pids").read_text().split())
    assert _live(pgid=pgid) == [] and _live(pids={pgid, grandchild}) == []  # the whole group is gone
    md = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {name} | {cases[name]['status']} |" in md for name in cases)


def test_refuses_without_a_gpu_unless_smoke(tmp_path, capsys):
    assert suite.main(["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "no CUDA device visible" in captured.err and "--smoke" in captured.err
    assert captured.out.splitlines()[0].startswith("python: ")  # versions first
    assert "kernels" in captured.out and not (tmp_path / "results.json").exists()
