"""`trainer.epochs` and `data.mix` through `python -m train`: the step count the manifests give,
and a mixed run killed with SIGKILL that resumes to exactly the uninterrupted losses."""
from __future__ import annotations

import pytest

from tests.helpers import TINY, kill_all, logged_steps, losses, run_train, start_train, wait_for
from tests.support.data import make_shards
from train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
BASE = (*TINY, "strategy=ddp", "schedule=constant", "data=webdataset", "data.num_workers=0",
        "trainer.micro_batch_size=2", "trainer.seq_len=16")


def test_epochs_run_the_steps_the_manifest_gives_and_end_on_the_epoch(tmp_path):
    s = make_shards(tmp_path, sizes=(6, 2, 8), min_len=8, max_len=8)  # 128 tokens = 4 steps of 2 x 16
    out = run_train([*BASE, f"data.urls={s.root}", "trainer.epochs=2", f"run.dir={tmp_path}/run"])
    assert "trainer.epochs=2: 8 steps = 2 x 128 tokens / (2 x 16)" in out.stderr
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["data_epoch"] == 2.0 and records[3]["data_epoch"] == 1.0  # each token twice
    from launch.finished import progress  # the sbatch requeue check reads the derived step count

    assert progress(tmp_path / "run") == (True, "step_00000008: step 8 of 8")


def test_mix_sigkill_resumes_exactly(tmp_path):
    a = make_shards(tmp_path, name="a", sizes=(7, 3, 12))
    b = make_shards(tmp_path, name="b", sizes=(5, 9), first_id=500, seed=1)
    mix = f"data.mix=[{{urls: '{a.root}', weight: 0.7}}, {{urls: '{b.root}', weight: 0.3, name: bee}}]"
    args = [*BASE, "data=mix", mix, "trainer.max_steps=20"]
    run_train([*args, f"run.dir={tmp_path}/ref"])
    run = tmp_path / "run"
    proc = start_train([*args, "checkpoint.every_steps=5", f"run.dir={run}"])
    wait_for(lambda: logged_steps(run) >= 12, proc=proc, what="step 12", timeout=240)
    kill_all(proc)
    out = run_train([*args, "checkpoint.every_steps=5", f"run.dir={run}"])
    assert "resumed from" in out.stderr
    assert losses(run) == losses(tmp_path / "ref")
    last = [r for r in read_metrics(run) if "loss" in r][-1]
    ref = [r for r in read_metrics(tmp_path / "ref") if "loss" in r][-1]
    assert last["data/tokens/a"] == ref["data/tokens/a"] and last["data/tokens/bee"] == ref["data/tokens/bee"]
    assert last["data/tokens/a"] + last["data/tokens/bee"] == 20 * 2 * 16
