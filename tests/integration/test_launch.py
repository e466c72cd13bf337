"""`python -m launch`: composition, validation and the rendered commands (no processes trained)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.__main__ import make_plan
from launch.__main__ import run as launch_run
from launch.commands import training_overrides
from launch.config import load_launch, node_local_reason, parse_time
from launch.slurm import TEMPLATE, slurm_plan
from tests.helpers import REPO
from tests.support.data import make_shards
from train.config import ConfigError, load_config

CONF = REPO / "conf"
# A run dir that is not node-local (not /tmp, /dev/shm, tmpfs) wherever the checkout lives; the
# tests only render commands for it and never write there.
SHARED = Path.home() / ".scaletrain-test-shared"
VENV_BIN = Path(sys.executable).parent


def composed(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


def plan_for(overrides: list[str]):
    req = load_launch(composed("launch", overrides))
    return req, make_plan(req, training_overrides(overrides))


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_launch(composed("launch", overrides))
    return err.value.problems


def test_launch_composes_the_same_training_config_as_train(tmp_path):
    ovr = ["experiment=demo", "strategy=zero2", "trainer.max_steps=7", f"run.dir={tmp_path}",
           f"data.urls={make_shards(tmp_path / 'shards').root}"]
    launch_raw = composed("launch", ["target=slurm", "launch.nnodes=2", *ovr])
    assert {"launch", "target", "dry_run"} <= set(launch_raw)
    assert load_config(launch_raw, world_size=2) == load_config(composed("train", ovr), world_size=2)


def test_only_training_overrides_reach_the_trainer():
    ovr = ["target=slurm", "dry_run=true", "launch.nnodes=2", "+launch.slurm.extra=[--x]",
           "hydra.verbose=true", "strategy=zero3", "+trainer.foo=1", "~export", "run.name=a=b"]
    assert training_overrides(ovr) == ["strategy=zero3", "+trainer.foo=1", "~export", "run.name=a=b"]


def test_local_single_node_is_torchrun_standalone(tmp_path):
    ovr = [f"run.dir={tmp_path}", "launch.nproc_per_node=2", "trainer.max_steps=3",
           "run.name=\"it's a run; $x\""]
    _, plan = plan_for(ovr)
    assert plan.argv == [str(VENV_BIN / "torchrun"), "--standalone", "--nnodes", "1",
                         "--nproc_per_node", "2", "-m", "train", f"run.dir={tmp_path}",
                         "trainer.max_steps=3", "run.name=\"it's a run; $x\""]
    assert shlex.split(plan.shell()) == plan.argv  # the printed line is properly shell-quoted
    assert plan.files == {}


def test_local_multi_node_uses_c10d_rendezvous(tmp_path):
    _, plan = plan_for([f"run.dir={SHARED / 'runs' / 'x'}", "launch.nnodes=2", "launch.node_rank=1",
                        "launch.nproc_per_node=4", "launch.gpus_per_node=4",
                        "launch.rdzv_endpoint=node001:29400"])
    assert plan.argv[1:] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4",
                             "--rdzv_backend", "c10d", "--rdzv_endpoint", "node001:29400",
                             "-m", "train", f"run.dir={SHARED / 'runs' / 'x'}"]


def test_deepspeed_single_node_and_hostfile(tmp_path):
    _, plan = plan_for([f"run.dir={tmp_path}", "target=deepspeed", "launch.nproc_per_node=2"])
    assert plan.argv == [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--module", "train",
                         f"run.dir={tmp_path}"]
    run_dir = SHARED / "runs" / "ds"
    _, plan = plan_for([f"run.dir={run_dir}", "target=deepspeed", "launch.nnodes=2",
                        "launch.gpus_per_node=8", "launch.hosts=[gpu1,gpu2]",
                        "launch.rdzv_endpoint=gpu1:29500", "strategy=zero3"])
    hostfile = run_dir / "launch" / "hostfile"
    assert plan.files == {hostfile: "gpu1 slots=8\ngpu2 slots=8\n"}
    assert plan.argv[1:] == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
                             "--master_addr", "gpu1", "--master_port", "29500", "--module", "train",
                             f"run.dir={run_dir}", "strategy=zero3"]


def test_every_problem_is_reported_at_once():
    problems = problems_of(["trainer.max_steps=0", "run.dir=/tmp/shared-or-not", "launch.nnodes=2",
                            "launch.gpus_per_node=2", "launch.nproc_per_node=4", "target=deepspeed",
                            "trainer.device=cuda", "launch.max_requeues=-1"])
    text = "\n".join(problems)
    for key in ("trainer.max_steps=0", "launch.nproc_per_node=4 > launch.gpus_per_node=2",
                "needs launch.rdzv_endpoint", "launch.hosts", "run.dir='/tmp/shared-or-not' is not on "
                "storage all 2 nodes share", "launch.max_requeues=-1"):
        assert key in text, (key, text)
    assert len(problems) == 6, text
    assert "trainer.device=cuda but launch.gpus_per_node=0" in "\n".join(
        problems_of(["trainer.device=cuda", "launch.gpus_per_node=0"]))
    assert any("launch.rdzv_endpoint='node1'" in p for p in problems_of(
        ["launch.nnodes=2", "launch.rdzv_endpoint=node1", f"run.dir={SHARED / 'runs' / 'x'}"]))
    assert any("target='k8s'" in p for p in problems_of(["target=k8s"]))
    assert any("launch.nodes: unknown key" in p for p in problems_of(["+launch.nodes=2"]))


def test_shared_run_dir_check_can_be_waived_and_is_skipped_on_one_node():
    load_launch(composed("launch", ["run.dir=/tmp/x", "launch.nnodes=2", "launch.rdzv_endpoint=h:1",
                                    "launch.require_shared_run_dir=false"]))
    load_launch(composed("launch", ["run.dir=/tmp/x"]))


@pytest.mark.parametrize("path,local", [("/tmp/run", True), ("/dev/shm/a/b", True), ("/var/tmp", True),
                                        (str(SHARED / "runs" / "x"), False)])
def test_node_local_paths(path, local):
    assert (node_local_reason(path) is not None) == local


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("10:00", 600), ("01:00:00", 3600),
                                          ("2-00:00:00", 172800), ("1-12", 129600), ("1-0:30", 88200),
                                          ("1h", None), ("", None)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


def test_slurm_settings_are_checked():
    text = "\n".join(problems_of(["target=slurm", "launch.slurm.time=1h", "launch.slurm.mem=lots",
                                  "launch.nproc_per_node=4", "launch.slurm.cpus_per_task=2",
                                  "launch.slurm.extra=['constraint=a100']"]))
    for key in ("launch.slurm.time='1h'", "launch.slurm.mem='lots'", "launch.slurm.cpus_per_task=2 < 4",
                "launch.slurm.extra item 'constraint=a100'"):
        assert key in text, (key, text)
    assert "not shorter than" in "\n".join(
        problems_of(["target=slurm", "launch.slurm.time=2", "launch.slurm.signal_seconds=120"]))


def test_slurm_job_script_rendered_from_config():
    run_dir = SHARED / "runs" / "not written" / "run 1"
    req, plan = plan_for([
        "target=slurm", f"run.dir={run_dir}", "run.name=llm", "launch.nnodes=2", "launch.gpus_per_node=8",
        "launch.slurm.cpus_per_task=64", "launch.slurm.mem=500G", "launch.slurm.time=2-00:00:00",
        "launch.slurm.partition=gpu", "launch.slurm.account=proj", "launch.slurm.qos=high",
        "launch.slurm.signal_seconds=300", "launch.max_requeues=5", "launch.slurm.extra=[--exclusive]",
        "strategy=zero3", "optim.lr=1e-4"])
    script_path = run_dir / "slurm" / "train.sbatch"
    assert plan.argv == ["sbatch", str(script_path)]
    script = plan.files[script_path]
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    logs = f'"{run_dir}/logs'
    assert directives == [
        "--job-name=llm", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
        "--mem=500G", "--time=2-00:00:00", "--partition=gpu", "--account=proj", "--qos=high",
        f"--chdir={Path.cwd()}", f'--output={logs}/slurm-%j.out"', f'--error={logs}/slurm-%j.err"',
        "--signal=B:USR1@300", "--requeue", "--open-mode=append", "--exclusive"]
    settings = script.split("### settings")[1].split("### end settings")[0]
    assert f"PYTHON={sys.executable}" in settings and "NPROC_PER_NODE=8" in settings
    assert "MAX_REQUEUES=5" in settings
    assert "TRAIN_OVERRIDES=(run.name=llm strategy=zero3 optim.lr=1e-4)" in settings  # run.dir: RUN_DIR
    assert f"RUN_DIR='{run_dir}'" in settings
    # Outside the two rendered blocks the job is the template, unchanged.
    template = TEMPLATE.read_text()
    assert script.split("### end settings ###")[1] == template.split("### end settings ###")[1]
    assert script.split("### SBATCH")[0] == template.split("### SBATCH")[0]
    for text in (script, template):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_slurm_plan_defaults_without_gpus(tmp_path):
    req = load_launch(composed("launch", ["target=slurm", f"run.dir={tmp_path}"]))
    script = next(iter(slurm_plan(req.launch, req.train, []).files.values()))
    directives = "\n".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    assert "--gpus-per-node" not in directives and "--mem" not in directives
    assert "--partition" not in directives and "#SBATCH --time=01:00:00" in directives
    assert "#SBATCH --job-name=tiny-ddp" in directives and "NPROC_PER_NODE=1" in script
    req = load_launch(composed("launch", ["target=slurm", f"run.dir={tmp_path}", "launch.slurm.time=90",
                                          "launch.slurm.mem=0"]))
    script = next(iter(slurm_plan(req.launch, req.train, []).files.values()))
    assert "#SBATCH --time=90\n" in script and "#SBATCH --mem=0\n" in script


def _launch_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_dry_run_prints_the_job_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    res = _launch_cli(["target=slurm", "dry_run=true", f"run.dir={run_dir}", "trainer.max_steps=5"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.rstrip().splitlines()
    assert lines[-1] == f"sbatch {run_dir}/slurm/train.sbatch"
    assert "#SBATCH --signal=B:USR1@120" in lines and "TRAIN_OVERRIDES=(trainer.max_steps=5)" in lines
    assert not run_dir.exists()


def test_cli_errors_name_every_problem_and_submit_nothing(tmp_path, monkeypatch):
    res = _launch_cli(["target=slurm", "trainer.max_steps=0", "launch.slurm.time=xyz",
                       f"run.dir={tmp_path / 'r'}"])
    assert res.returncode == 2
    assert "trainer.max_steps=0" in res.stderr and "launch.slurm.time='xyz'" in res.stderr
    # A valid job but no SLURM client: a clear error before anything is written or submitted.
    monkeypatch.setenv("PATH", str(tmp_path))
    overrides = ["target=slurm", f"run.dir={tmp_path / 'r'}"]
    with pytest.raises(FileNotFoundError, match="sbatch not found on PATH"):
        launch_run(composed("launch", overrides), overrides)
    assert not (tmp_path / "r").exists()


def test_launch_never_imports_the_training_loop():
    code = ("import runpy, sys; sys.argv = ['launch', 'dry_run=true', 'target=slurm']\n"
            "try: runpy.run_module('launch', run_name='__main__')\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'train.loop' not in sys.modules and 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=120)


def test_run_dir_helper_for_hand_submitted_jobs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch.run_dir", "run.name=abc", "--local_rank=0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "runs" / "abc")


def _checkpoint(run_dir: Path, step: int, tokens: int, max_steps: int, max_tokens: int | None) -> None:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(f'{{"step": {step}, "tokens": {tokens}, "world_size": 2}}')
    limit = "null" if max_tokens is None else max_tokens
    (ckpt / "config.yaml").write_text(f"trainer:\n  max_steps: {max_steps}\n  max_tokens: {limit}\n")
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")


def test_finished_reads_the_latest_checkpoint(tmp_path):
    from launch.finished import progress

    assert progress(tmp_path) == (False, f"no {tmp_path / 'checkpoints' / 'latest'}")
    _checkpoint(tmp_path, 32, 4096, 100, None)
    assert progress(tmp_path) == (False, "step_00000032: step 32 of 100")
    _checkpoint(tmp_path, 100, 12800, 100, None)
    assert progress(tmp_path) == (True, "step_00000100: step 100 of 100")
    _checkpoint(tmp_path / "t", 40, 5120, 100, 5000)
    assert progress(tmp_path / "t") == (True, "step_00000040: 5120 tokens of 5000")
    res = subprocess.run([sys.executable, "-m", "launch.finished", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "finished: step_00000100: step 100 of 100\n")
