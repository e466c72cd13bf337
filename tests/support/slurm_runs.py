"""Training runs shared by the launch and SLURM tests: one config, one uninterrupted reference.

Every launcher test trains the same tiny run (2 ranks, 100 steps of the tiny model on
32-token sequences) and compares its loss curve with `launch_reference`, the same run started
by `python -m launch target=local` (torchrun --standalone, 2 ranks) once per session.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env, losses  # noqa: F401  (child_env: for the SLURM test modules)

MAX_STEPS = 100
RUN = ["model=tiny", "trainer.seq_len=32", "trainer.log_every=1", f"trainer.max_steps={MAX_STEPS}",
       "trainer.micro_batch_size=2"]
"""Training overrides of every launcher test (world size 2, global batch 4)."""


def launch_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def run_launch(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` to completion; fails the test with the output when it fails."""
    res = subprocess.run(launch_cmd(args), cwd=REPO, env=env or child_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"launch failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def assert_same_curve(run_dir: Path, reference: dict[int, float]) -> None:
    """Every step's loss of `run_dir` equals the reference (the same global batches and math)."""
    curve = losses(run_dir)
    assert sorted(curve) == sorted(reference), (sorted(curve)[-3:], len(curve))
    for step, loss in reference.items():
        assert curve[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), (step, curve[step], loss)


def metrics_steps(run_dir: Path) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return out


def reference_curve(run_dir: Path) -> dict[int, float]:
    """Loss per step of the uninterrupted run, launched by `python -m launch target=local` (the
    session fixture `launch_reference` in tests/conftest.py runs it once)."""
    res = run_launch(["target=local", "launch.nproc_per_node=2", f"run.dir={run_dir}", *RUN])
    assert "--standalone --nnodes 1 --nproc_per_node 2 -m train" in res.stderr
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, MAX_STEPS + 1))
    assert curve[MAX_STEPS] < curve[1], "the loss should fall on the synthetic data"
    return curve


# --- SLURM job helpers (the cluster objects come from slurm_cluster.py / slurm_netns.py) ---

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}
"""Job states after which nothing more happens (a requeue passes through COMPLETING and PENDING)."""


def job_logs(run_dir: Path, job: int) -> str:
    logs = [run_dir / "logs" / f"slurm-{job}.{ext}" for ext in ("out", "err")]
    return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


def signal_at(cluster, run_dir: Path, job: int, min_step: int) -> None:
    """Once the run has logged `min_step`, send USR1 to the batch script (as SLURM does before the
    time limit)."""
    deadline = time.monotonic() + 240
    while max(metrics_steps(run_dir), default=0) < min_step:
        info = cluster.job(job)
        assert info["JobState"] not in ENDED, (info, job_logs(run_dir, job))
        assert time.monotonic() < deadline, job_logs(run_dir, job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))


def wait_done(cluster, run_dir: Path, job: int, restarts: int) -> str:
    """Wait until the job ended after `restarts` requeues; its logs."""
    deadline = time.monotonic() + 240
    while True:
        info = cluster.wait_job(job, ENDED,
                                timeout=max(1, deadline - time.monotonic()))
        if info["JobState"] != "COMPLETED" or int(info["Restarts"]) >= restarts:
            break
        time.sleep(0.5)  # an attempt may show COMPLETED for a moment before its requeue lands
    logs = job_logs(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == restarts, (info, logs)
    return logs


def stops_in(logs: str) -> list[int]:
    return [int(s) for s in dict.fromkeys(re.findall(r"checkpointed step (\d+), exiting", logs))]


def wait_for_stop(run_dir: Path, job: int) -> int:
    """The step at which the signalled attempt checkpointed and stopped."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stops = stops_in(job_logs(run_dir, job))
        if stops:
            return stops[-1]
        time.sleep(0.2)
    raise AssertionError(job_logs(run_dir, job))
