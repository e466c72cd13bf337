"""The SLURM lifecycle on a real local cluster (munged + slurmctld + slurmd, see slurm_cluster.py)."""
from __future__ import annotations

import re
import socket
import sys

import pytest

from tests.support.slurm_runs import (  # noqa: F401
    MAX_STEPS,
    REPO,
    RUN,
    assert_same_curve,
    child_env,
    run_launch,
    signal_at,
    stops_in,
    wait_done,
    wait_for_stop,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


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


@pytest.mark.timeout(420)
def test_rendered_job_checkpoints_requeues_on_usr1_and_resumes(cluster, launch_reference, tmp_path):
    """USR1 mid-run: every rank checkpoints, the job requeues itself, the next attempt resumes and
    finishes without requeueing. Together they end like the uninterrupted run (same losses), with
    a final checkpoint, an HF export and one W&B run over both attempts."""
    run_dir = tmp_path / "run"
    env = child_env(SLURM_CONF=str(cluster.conf))
    res = run_launch(["target=slurm", f"run.dir={run_dir}", "launch.nproc_per_node=2",
                      "launch.slurm.cpus_per_task=2", "launch.slurm.time=15", "launch.max_requeues=1",
                      "export=hf", "tracking=wandb", *RUN], env=env, timeout=120)
    m = re.search(r"^Submitted batch job (\d+)$", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    job = int(m.group(1))

    signal_at(cluster, run_dir, job, 2)
    stop = wait_for_stop(run_dir, job)
    logs = wait_done(cluster, run_dir, job, restarts=1)
    assert stops_in(logs) == [stop] and 2 <= stop < MAX_STEPS, logs
    assert "attempt 0" in logs and "attempt 1" in logs, logs  # --open-mode=append kept attempt 0
    assert f"not finished: step_{stop:08d}: step {stop} of {MAX_STEPS}" in logs, logs
    assert "requeueing (requeue 1 of 1)" in logs, logs
    assert f"step_{stop:08d} at step {stop}" in logs, logs  # attempt 1 resumed there
    assert "training ended; no requeue requested" in logs, logs  # a finished job does not requeue
    assert not (run_dir / "STOP").exists()

    assert_same_curve(run_dir, launch_reference)
    final = f"step_{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final
    assert (run_dir / "exports" / final / "config.json").is_file(), logs
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline_runs = list((run_dir / "wandb").rglob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs), (run_id, offline_runs)


@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun(cluster, launch_reference, tmp_path):
    """srun starts one task per rank (as Hydra's submitit launcher does); no torchrun involved."""
    res = cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", "--chdir", str(REPO),
                      sys.executable, "-m", "train", f"run.dir={tmp_path}", *RUN,
                      env=child_env(), timeout=280, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 2" in res.stdout + res.stderr
    assert_same_curve(tmp_path, launch_reference)
