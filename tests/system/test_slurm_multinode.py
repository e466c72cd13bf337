"""The rendered job on two real SLURM nodes (two network namespaces, see slurm_netns.py)."""
from __future__ import annotations

import re
import sys

import pytest

from tests.support.slurm_runs import (  # noqa: F401
    MAX_STEPS,
    REPO,
    RUN,
    assert_same_curve,
    child_env,
    signal_at,
    stops_in,
    wait_done,
    wait_for_stop,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_two_node_job_stops_on_both_nodes_and_resumes_by_hand(slurm_two_nodes, launch_reference, tmp_path):
    """srun starts torchrun on n1 and n2 (c10d at n1). USR1 stops the ranks of both nodes at the same
    step through the shared STOP file; with launch.max_requeues=0 the job does not requeue;
    `sbatch RUN_DIR/slurm/train.sbatch` resumes it by hand; the curve equals one 2-rank node."""
    cluster = slurm_two_nodes
    cluster.wait_idle()
    run_dir = tmp_path / "run"
    env = child_env()
    # Both "nodes" are this machine, so a run dir under /tmp is shared: waive the check.
    res = cluster.run(sys.executable, "-m", "launch", "target=slurm", "launch.nnodes=2", "launch.nproc_per_node=1",
                      "launch.slurm.cpus_per_task=1", "launch.slurm.time=15", "launch.max_requeues=0",
                      "launch.require_shared_run_dir=false", f"run.dir={run_dir}", *RUN,
                      env=env, timeout=120, cwd=str(REPO))
    job = int(re.search(r"^Submitted batch job (\d+)$", res.stdout, re.M).group(1))
    try:
        signal_at(cluster, run_dir, job, 2)
        stop = wait_for_stop(run_dir, job)
        logs = wait_done(cluster, run_dir, job, restarts=0)
        job2 = cluster.sbatch(str(run_dir / "slurm" / "train.sbatch"), env=env)
        logs2 = wait_done(cluster, run_dir, job2, restarts=0)
    finally:
        cluster.cancel_all()
    assert cluster.job(job)["NodeList"] == "n[1-2]"
    assert "2 node(s) x 1 rank(s), rendezvous n1:" in logs, logs
    for rank in (0, 1):  # one rank per node: both stopped at the same step
        assert re.search(rf"r{rank}\] WARNING stop requested .*checkpointed step {stop}, exiting", logs), logs
    assert stops_in(logs) == [stop] and stop < MAX_STEPS, logs
    assert "requeue limit reached (0 of 0)" in logs, logs
    assert f"step_{stop:08d} at step {stop}" in logs2, logs2  # resumed by hand
    assert_same_curve(run_dir, launch_reference)
