"""The SLURM lifecycle on a real local cluster (munged + slurmctld + slurmd, see slurm_cluster.py)."""
from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from tests.slurm_runs import (MAX_STEPS, REPO, RUN, assert_same_curve, child_env,  # noqa: F401
                              launch_reference, metrics_steps, run_launch)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}
"""Job states after which nothing more happens (a requeue passes through COMPLETING and PENDING)."""


@pytest.fixture
def cluster(slurm_cluster):
    """The session's cluster, idle at the start of the test and cleared of its jobs after it."""
    slurm_cluster.wait_idle()
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.mark.timeout(120)
def test_cluster_runs_a_batch_job(cluster, tmp_path):
    out = tmp_path / "hostname.out"
    job = cluster.sbatch("--wrap", "hostname; echo cpus=$SLURM_CPUS_ON_NODE", f"--output={out}",
                               "--cpus-per-task=2")
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert out.read_text().split() == [socket.gethostname().split(".")[0], "cpus=2"]


def _job_logs(run_dir: Path, job: int) -> str:
    logs = [run_dir / "logs" / f"slurm-{job}.{ext}" for ext in ("out", "err")]
    return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


def _signal_at(cluster, run_dir: Path, job: int, min_step: int) -> None:
    """Once the run has logged `min_step`, send USR1 to the batch script (as SLURM does before the
    time limit)."""
    deadline = time.monotonic() + 240
    while max(metrics_steps(run_dir), default=0) < min_step:
        info = cluster.job(job)
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # a requeued attempt
        assert info["JobState"] not in ENDED, (info, _job_logs(run_dir, job))
        assert time.monotonic() < deadline, _job_logs(run_dir, job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))


def _wait_done(cluster, run_dir: Path, job: int, restarts: int) -> str:
    """Wait until the job ended after `restarts` requeues (releasing requeued attempts); its logs."""
    deadline = time.monotonic() + 240
    while True:
        info = cluster.wait_job(job, ENDED,
                                timeout=max(1, deadline - time.monotonic()), release_begin_time=True)
        if info["JobState"] != "COMPLETED" or int(info["Restarts"]) >= restarts:
            break
        time.sleep(0.5)  # an attempt may show COMPLETED for a moment before its requeue lands
    logs = _job_logs(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == restarts, (info, logs)
    return logs


def _stops(logs: str) -> list[int]:
    return [int(s) for s in dict.fromkeys(re.findall(r"checkpointed step (\d+), exiting", logs))]


@pytest.mark.timeout(480)
def test_rendered_job_requeues_on_usr1_up_to_the_limit_and_resumes(cluster, launch_reference, tmp_path):
    """USR1 mid-run: every rank checkpoints and the job requeues itself (launch.max_requeues=1);
    the second USR1 stops it for good; `sbatch RUN_DIR/slurm/train.sbatch` resumes it by hand.
    Together they end like the uninterrupted run (same losses), with a final checkpoint, an HF
    export and one W&B run over all three attempts."""
    run_dir = tmp_path / "run"
    env = child_env(SLURM_CONF=str(cluster.conf))
    res = run_launch(["target=slurm", f"run.dir={run_dir}", "launch.nproc_per_node=2",
                      "launch.slurm.cpus_per_task=2", "launch.slurm.time=15", "launch.max_requeues=1",
                      "export=hf", "tracking=wandb", *RUN], env=env, timeout=120)
    m = re.search(r"^Submitted batch job (\d+)$", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    job = int(m.group(1))

    _signal_at(cluster, run_dir, job, 2)  # attempt 0: checkpoint, requeue
    first = _wait_for_stop(run_dir, job)
    _signal_at(cluster, run_dir, job, first + 2)  # attempt 1: checkpoint, limit reached
    logs = _wait_done(cluster, run_dir, job, restarts=1)
    stops = _stops(logs)
    assert len(stops) == 2 and 2 <= stops[0] < stops[1] < MAX_STEPS, (stops, logs)
    assert "attempt 0" in logs and "attempt 1" in logs, logs  # --open-mode=append kept attempt 0
    assert f"not finished: step_{stops[0]:08d}: step {stops[0]} of {MAX_STEPS}" in logs, logs
    assert "requeueing (requeue 1 of 1)" in logs and "requeue limit reached (1 of 1)" in logs, logs
    assert f"step_{stops[0]:08d} at step {stops[0]}" in logs, logs  # attempt 1 resumed there
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stops[1]:08d}"

    # Resume by hand from the kept job script; a job that finishes normally does not requeue.
    job2 = cluster.sbatch(str(run_dir / "slurm" / "train.sbatch"), env=env)
    logs2 = _wait_done(cluster, run_dir, job2, restarts=0)
    assert f"step_{stops[1]:08d} at step {stops[1]}" in logs2, logs2
    assert "training ended; no requeue requested" in logs2, logs2
    assert not (run_dir / "STOP").exists()

    assert_same_curve(run_dir, launch_reference)
    final = f"step_{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final
    assert (run_dir / "exports" / final / "config.json").is_file(), logs2
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline_runs = list((run_dir / "wandb").rglob("offline-run-*"))
    assert len(offline_runs) >= 1 and all(p.name.endswith(run_id) for p in offline_runs), (run_id, offline_runs)


def _wait_for_stop(run_dir: Path, job: int) -> int:
    """The step at which the signalled attempt checkpointed and stopped."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stops = _stops(_job_logs(run_dir, job))
        if stops:
            return stops[-1]
        time.sleep(0.2)
    raise AssertionError(_job_logs(run_dir, job))


@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun(cluster, launch_reference, tmp_path):
    """srun starts one task per rank (as Hydra's submitit launcher does); no torchrun involved."""
    res = cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", "--chdir", str(REPO),
                            sys.executable,
                            "-m", "train", f"run.dir={tmp_path}", *RUN,
                            env=child_env(), timeout=280, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 2" in res.stdout + res.stderr
    assert_same_curve(tmp_path, launch_reference)
