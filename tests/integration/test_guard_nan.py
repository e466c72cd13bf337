"""The NaN guard end to end: bad steps skipped by every rank together, a rollback past the bad
data, finite checkpoints and export, and a clear error once the rollbacks are used up."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY, child_env, run_train
from train.checkpoint import _retain
from train.config import TrainerConfig
from train.guard import StepGuard, first_nonfinite, optimizer_tensors
from train.metrics import read_metrics

# NaN on rank 1 only at step 6 (the guard must see it on every rank), then on both ranks.
NAN = "nan@6/1,nan@7,nan@8"
RUN = [*TINY, "trainer.max_steps=10", "checkpoint.every_steps=4", "trainer.max_bad_steps=3",
       "trainer.log_every=100", "schedule=constant"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_nan_steps_skipped_rolled_back_past_the_bad_data(tmp_path, strategy):
    run_dir = tmp_path / "run"
    extra = ["export=hf", "export.verify=false"] if strategy == "ddp" else []
    run_train([*RUN, f"strategy={strategy}", f"run.dir={run_dir}", *extra], nproc=2, timeout=900,
              env=child_env(SCALETRAIN_FAULT=NAN))
    records = read_metrics(run_dir)
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [6, 7, 8]  # rank 1's NaN at step 6 was skipped on rank 0 as well
    rollback = next(r for r in records if "rollback" in r)
    assert rollback == {**rollback, "step": 4, "rolled_back_from": 8, "rollback": 1}
    last = [r for r in records if r.get("step") == 10 and "loss" in r][-1]
    assert math.isfinite(last["loss"]) and last["skipped_steps"] == 3 and last["rollbacks"] == 1
    # The loader moved on past the bad window: 4 steps' data (steps 5-8 of the first try) skipped.
    ckpt = run_dir / "checkpoints" / "step_00000010"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["finite"] is True and state["step"] == 10
    data = torch.load(ckpt / "data" / "rank_00000.pt", weights_only=True)
    assert data["next_global"] == (10 + 4) * 2 * 2  # (steps + skipped) x micro batch x ranks
    if strategy == "ddp":  # a finite export, even with export.verify=false
        tensors = load_file(next((run_dir / "exports" / "step_00000010").glob("*.safetensors")))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_rollbacks_used_up_stop_with_the_steps_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "trainer.max_steps=8", "checkpoint.every_steps=2", "trainer.max_bad_steps=2",
                      "trainer.max_rollbacks=1", f"run.dir={run_dir}"], check=False,
                     env=child_env(SCALETRAIN_FAULT="nan@3,nan@4,nan@5,nan@6"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "training diverged" in proc.stderr and "step 5 (loss is nan), step 6 (loss is nan)" in proc.stderr
    assert "rollback 1 after: step 3 (loss is nan), step 4 (loss is nan)" in proc.stderr
    assert all(json.loads((p / "trainer_state.json").read_text())["finite"]
               for p in (run_dir / "checkpoints").glob("step_*"))


def test_diverging_lr_stops_with_an_error_instead_of_training_on_nan(tmp_path):
    """The issue's case: optim.lr=1e6 used to train on NaN weights to max_steps and exit 0."""
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "optim.lr=1e6", "trainer.max_steps=12", "checkpoint.every_steps=2",
                      "trainer.max_bad_steps=2", "trainer.max_rollbacks=1", f"run.dir={run_dir}"], check=False)
    assert proc.returncode == 1 and "training diverged" in proc.stderr and "is nan" in proc.stderr
    states = [json.loads((p / "trainer_state.json").read_text()) for p in (run_dir / "checkpoints").glob("step_*")]
    assert states and all(s["finite"] for s in states)


def test_spike_is_skipped_and_nan_always():
    guard = StepGuard(TrainerConfig(spike_factor=3.0, max_bad_steps=2), verbose=False)
    assert guard.verdict(float("nan")) == "loss is nan"
    for step in range(1, 11):
        assert guard.verdict(2.0) is None and guard.record(step, 2.0, 1.0, None)
    assert guard.verdict(5.9) is None
    reason = guard.verdict(6.5)
    assert reason and "3.0 x the running median 2" in reason
    assert not guard.record(11, 6.5, 1.0, reason)
    assert not guard.record(12, 2.0, float("inf"), None)  # a non-finite grad norm is bad too
    assert guard.rollback_due() and guard.metrics() == {"skipped_steps": 2.0, "bad_steps": 2.0, "rollbacks": 0.0}


def _fake_checkpoint(root: Path, step: int, finite: bool | None) -> Path:
    p = root / f"step_{step:08d}"
    p.mkdir(parents=True)
    state = {"step": step, "files": {}}
    if finite is not None:
        state["finite"] = finite
    (p / "trainer_state.json").write_text(json.dumps(state))
    return p


def test_retention_keeps_the_newest_finite_checkpoint(tmp_path):
    finite = _fake_checkpoint(tmp_path, 2, True)
    for step in (4, 6, 8):
        _fake_checkpoint(tmp_path, step, None)  # unchecked (older trainer)
    _retain(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000006", "step_00000008"]
    assert finite.is_dir()
    shutil.rmtree(tmp_path / "step_00000006")
    _fake_checkpoint(tmp_path, 10, True)
    _retain(tmp_path, keep_last=1)  # now the newest is itself finite: the old finite one may go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


def test_nonfinite_weights_or_optimizer_state_are_found_by_name():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    named = lambda: [*model.named_parameters(), *optimizer_tensors(opt)]  # noqa: E731
    assert first_nonfinite(named(), torch.device("cpu")) is None
    opt.state[model.bias]["exp_avg_sq"][1] = float("inf")
    assert first_nonfinite(named(), torch.device("cpu")) == "optim.group0.param1.exp_avg_sq"
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert first_nonfinite(named(), torch.device("cpu")) == "weight"
