"""The SLURM lifecycle on a real local cluster (munged + slurmctld + slurmd, see slurm_cluster.py)."""
from __future__ import annotations

import re
import socket
import sys
import time

import pytest

from tests.support.slurm_runs import (  # noqa: F401
    ENDED,
    MAX_STEPS,
    REPO,
    RUN,
    assert_same_curve,
    child_env,
    job_logs,
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


@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun(cluster, launch_reference, tmp_path):
    """srun starts one task per rank (as Hydra's submitit launcher does); no torchrun involved."""
    res = cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", "--chdir", str(REPO),
                      sys.executable, "-m", "train", f"run.dir={tmp_path}", *RUN,
                      env=child_env(), timeout=280, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 2" in res.stdout + res.stderr
    assert_same_curve(tmp_path, launch_reference)


def _clock(logs: str, pattern: str) -> list[int]:
    """Seconds of day of every `[train.sbatch HH:MM:SS] <pattern>` line, in order."""
    return [int(h) * 3600 + int(m) * 60 + int(s)
            for h, m, s in re.findall(r"\[train\.sbatch (\d\d):(\d\d):(\d\d)\] " + pattern, logs)]


@pytest.mark.timeout(600)
def test_rendered_job_requeues_three_times_on_usr1_and_resumes(cluster, launch_reference, tmp_path):
    """Three USR1 -> checkpoint -> requeue -> resume cycles of one rendered job on an idle node (the
    scheduler's next pass comes at once: the case that once relaunched the job while its previous
    attempt still held a revoked credential). Every rank checkpoints the same step; each relaunch
    waits in SLURM's requeue hold (Reason=BeginTime, AuthInfo=cred_expire) instead of racing it and
    resumes there; the last attempt finishes without requeueing. Together they end COMPLETED like
    the uninterrupted run (same losses), with a final checkpoint, an HF export and one W&B run over
    the four attempts, and each requeue logged the command that would resume the run by hand."""
    from tests.support.slurm_cluster import CRED_EXPIRE_S

    run_dir = tmp_path / "run"
    # 50 ms more per step, the same numbers: each attempt runs long enough to be signalled mid-way
    env = child_env(SLURM_CONF=str(cluster.conf), SCALETRAIN_FAULT="delay@0.05")
    res = run_launch(["target=slurm", f"run.dir={run_dir}", "launch.nproc_per_node=2",
                      "launch.slurm.cpus_per_task=2", "launch.slurm.time=15", "launch.max_requeues=3",
                      "export=hf", "tracking=wandb", *RUN], env=env, timeout=120)
    job = int(re.search(r"^Submitted batch job (\d+)$", res.stdout, re.M).group(1))
    stops: list[int] = []
    held = 0
    for cycle in range(3):
        signal_at(cluster, run_dir, job, (stops[-1] if stops else 0) + 2)
        deadline = time.monotonic() + 120
        while len(stops_in(job_logs(run_dir, job))) <= cycle:
            assert time.monotonic() < deadline, job_logs(run_dir, job)
            time.sleep(0.2)
        stops = stops_in(job_logs(run_dir, job))
        # the requeued attempt sits in SLURM's hold on the idle node before it starts
        deadline = time.monotonic() + 60
        while True:
            info = cluster.job(job)
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                held += 1
                break
            assert int(info.get("Restarts", 0)) <= cycle + 1 and info.get("JobState") not in ENDED, info
            assert time.monotonic() < deadline, (info, job_logs(run_dir, job))
            time.sleep(0.2)
    logs = wait_done(cluster, run_dir, job, restarts=3)
    assert held == 3 and len(stops) == 3 and stops == sorted(stops) and stops[-1] < MAX_STEPS, (stops, logs)
    for k, stop in zip((1, 2, 3), stops):
        assert f"attempt {k}:" in logs and f"requeueing (requeue {k} of 3)" in logs, logs
        assert f"not finished: step_{stop:08d}: step {stop} of {MAX_STEPS}" in logs, logs
        assert f"step_{stop:08d} at step {stop}" in logs, logs  # attempt k resumed there
    assert "attempt 0:" in logs, logs  # --open-mode=append kept every attempt's log
    assert "training ended; no requeue requested" in logs, logs  # a finished job does not requeue
    assert not (run_dir / "STOP").exists()
    assert logs.count(f"resume with: sbatch {run_dir / 'slurm' / 'train.sbatch'}") == 3, logs
    requeued, started = _clock(logs, "requeueing"), _clock(logs, rf"job {job} attempt [123]:")
    assert len(requeued) == len(started) == 3, logs
    for r, s in zip(requeued, started):
        assert (s - r) % 86400 >= CRED_EXPIRE_S - 1, (requeued, started, logs)
    assert "credential revoked" not in cluster.logs(tail=100000).lower()
    assert_same_curve(run_dir, launch_reference)
    final = f"step_{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final
    assert (run_dir / "exports" / final / "config.json").is_file(), logs
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline_runs = list((run_dir / "wandb").rglob("offline-run-*"))
    assert len(offline_runs) == 4 and all(p.name.endswith(run_id) for p in offline_runs), (run_id, offline_runs)
