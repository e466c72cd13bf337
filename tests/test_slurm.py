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
# The loop writes exports once it calls the export helper (train.export); until then the job is
# checked for its checkpoints only.
LOOP_EXPORTS = "train.export" in (REPO / "train" / "loop.py").read_text()


@pytest.mark.timeout(120)
def test_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "hostname.out"
    job = slurm_cluster.sbatch("--wrap", "hostname; echo cpus=$SLURM_CPUS_ON_NODE", f"--output={out}",
                               "--cpus-per-task=2")
    info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert out.read_text().split() == [socket.gethostname().split(".")[0], "cpus=2"]


def _job_logs(run_dir: Path, job: int) -> str:
    logs = [run_dir / "logs" / f"slurm-{job}.{ext}" for ext in ("out", "err")]
    return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


@pytest.mark.timeout(420)
def test_rendered_job_checkpoints_requeues_on_usr1_and_resumes(slurm_cluster, launch_reference, tmp_path):
    """USR1 mid-run: every rank checkpoints, the job requeues itself, resumes and ends like an
    uninterrupted run (same losses), with a final checkpoint, an HF export and one W&B run."""
    slurm_cluster.wait_idle()
    run_dir = tmp_path / "run"
    env = child_env(SLURM_CONF=str(slurm_cluster.conf))
    res = run_launch(["target=slurm", f"run.dir={run_dir}", "launch.nproc_per_node=2",
                      "launch.slurm.cpus_per_task=2", "launch.slurm.time=15", "launch.max_requeues=1",
                      "export=hf", "tracking=wandb", *RUN], env=env, timeout=120)
    m = re.search(r"^Submitted batch job (\d+)$", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    job = int(m.group(1))

    # Wait until the ranks are training, then signal the batch script as SLURM would before the limit.
    deadline = time.monotonic() + 200
    while max(metrics_steps(run_dir), default=0) < 2:
        state = slurm_cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), (state, _job_logs(run_dir, job))
        assert time.monotonic() < deadline, _job_logs(run_dir, job)
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    deadline = time.monotonic() + 300
    while True:  # the requeued attempt waits for BeginTime: release it, then wait for the end
        info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                                      timeout=max(1, deadline - time.monotonic()), release_begin_time=True)
        if info["JobState"] != "COMPLETED" or int(info["Restarts"]) >= 1:
            break
        time.sleep(0.5)  # attempt 0 may show COMPLETED for a moment before the requeue lands
    logs = _job_logs(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)

    # Attempt 0 stopped early at a step boundary, checkpointed and requeued; attempt 1 resumed from it.
    stopped = re.search(r"checkpointed step (\d+), exiting", logs)
    assert stopped and 2 <= int(stopped.group(1)) < MAX_STEPS, logs
    assert "attempt 0" in logs and "attempt 1" in logs, logs  # --open-mode=append kept attempt 0
    assert "requeueing (requeue 1 of 1)" in logs and "training finished" in logs, logs
    assert f"step_{int(stopped.group(1)):08d} at step {stopped.group(1)}" in logs, logs  # resumed there
    assert not (run_dir / "STOP").exists()

    assert_same_curve(run_dir, launch_reference)
    final = f"step_{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final
    if LOOP_EXPORTS:
        assert (run_dir / "exports" / final / "config.json").is_file(), logs
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline_runs = list((run_dir / "wandb").rglob("offline-run-*"))
    assert offline_runs and all(p.name.endswith(run_id) for p in offline_runs), (run_id, offline_runs)


@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun(slurm_cluster, launch_reference, tmp_path):
    """srun starts one task per rank (as Hydra's submitit launcher does); no torchrun involved."""
    slurm_cluster.wait_idle()
    res = slurm_cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", "--chdir", str(REPO),
                            sys.executable,
                            "-m", "train", f"run.dir={tmp_path}", *RUN,
                            env=child_env(), timeout=280, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 2" in res.stdout + res.stderr
    assert_same_curve(tmp_path, launch_reference)
