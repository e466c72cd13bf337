"""Real launches without SLURM: two torchrun "nodes" and the deepspeed launcher, 2 gloo ranks each."""
from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REPO, child_env, free_port
from tests.support.slurm_runs import RUN, assert_same_curve, launch_cmd, run_launch


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_torchrun_nodes_match_one_node(launch_reference, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # Both "nodes" are this machine, so the run dir under /tmp is shared: waive the check.
    common = ["target=local", "launch.nnodes=2", "launch.nproc_per_node=1", f"launch.rdzv_endpoint={endpoint}",
              "launch.require_shared_run_dir=false", f"run.dir={tmp_path}", *RUN]
    nodes = [subprocess.Popen(launch_cmd([*common, f"launch.node_rank={rank}"]), cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-5000:]
    assert f"--nnodes 2 --node_rank 1 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint {endpoint}" \
        in outputs[1]
    assert "world 2" in "".join(outputs)  # the trainer saw one process group over both "nodes"
    assert_same_curve(tmp_path, launch_reference)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_launcher_runs_the_module(launch_reference, tmp_path):
    res = run_launch(["target=deepspeed", "launch.nproc_per_node=2", f"launch.rdzv_endpoint=127.0.0.1:{free_port()}",
                      f"run.dir={tmp_path}", *RUN])
    log = res.stdout + res.stderr
    assert "--num_gpus 2" in log and "--module train" in log
    # DeepSpeed's launcher runs `python -m train --local_rank=N ...`; the trainer accepts it.
    assert "'-m', 'train', '--local_rank=0'" in log and "'-m', 'train', '--local_rank=1'" in log, log[-4000:]
    assert_same_curve(tmp_path, launch_reference)
