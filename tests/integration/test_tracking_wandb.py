"""The W&B tracker in-process, offline, checked by reading the run's own .wandb files back."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.support.wandb_offline import offline_runs
from train.tracking import NullTracker, TrackingConfig, build_tracker
from train.tracking.redact import REDACTED

CONFIG = {"run": {"name": "unit"}, "trainer": {"max_steps": 8, "seq_len": 32},
          "model": {"num_key_value_heads": 2}}


@pytest.fixture(autouse=True, scope="module")
def _stop_wandb_service():
    """In-process runs start a wandb-core service and export WANDB_SERVICE; stop it afterwards so
    later tests' subprocesses start their own instead of attaching to this one."""
    yield
    import wandb

    wandb.teardown()


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg(**kw) -> TrackingConfig:
    return TrackingConfig(**{"kind": "wandb", "mode": "offline", "system_stats": False, **kw})


def _tracker(run_dir: Path, resume: bool = False, config: dict | None = None, **kw):
    return build_tracker(_cfg(**kw), run_dir=run_dir, rank=0, world_size=2, config=config or CONFIG,
                         resume=resume)


def _record(step: int) -> dict:
    return {"step": step, "loss": 4.0 - 0.1 * step, "lr": 1e-3 * step, "tokens": 64 * step,
            "tokens_per_s": 1000.0 + step, "data_wait_frac": 0.01}


def test_offline_run_holds_history_config_export_and_alerts(tmp_path, caplog):
    export = tmp_path / "exports" / "step_00000004"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    tracker = _tracker(tmp_path, tags=["unit"], group="g")
    with caplog.at_level(logging.WARNING, logger="scaletrain.tracking"):
        for step in range(1, 5):
            tracker.log(_record(step), step)
        tracker.log({"eval_loss": 3.5, "eval_ppl": math.exp(3.5)}, 4)
        tracker.log({"checkpoint_time_s": 0.25}, 4)
        tracker.log_export(export, {"step": 4, "format": "hf"})
        tracker.log({**_record(5), "loss": math.nan}, 5)
    tracker.finish()
    tracker.finish()  # idempotent

    assert "loss is nan at step 5" in caplog.text
    (run,) = offline_runs(tmp_path)
    assert run.run_id == (tmp_path / "wandb" / "run_id").read_text().strip()
    assert run.exit_code == 0
    steps = [h["_step"] for h in run.history]
    assert steps == [1, 2, 3, 4, 5]
    h4 = run.history[3]
    assert h4["loss"] == pytest.approx(3.6) and h4["lr"] == pytest.approx(4e-3)
    assert h4["eval_loss"] == 3.5 and h4["checkpoint_time_s"] == 0.25  # same step: one row
    assert h4["sys/host_rss_gb"] > 0 and h4["alerts/loss_nonfinite"] == 0
    assert run.history[4]["alerts/loss_nonfinite"] == 1
    assert run.config["trainer"] == CONFIG["trainer"] and run.config["run"] == CONFIG["run"]
    assert run.config["runtime"]["world_size"] == 2
    (art,) = run.artifacts
    assert art["type"] == "model" and set(art["aliases"]) == {"latest", "step_4"}
    (entry,) = art["manifest"]["contents"]  # by reference: the path is recorded, nothing uploaded
    assert entry["ref"] == (export / "config.json").resolve().as_uri()


def test_resume_continues_the_run_and_never_steps_back(tmp_path):
    first = _tracker(tmp_path)
    for step in range(1, 7):  # logged up to 6, then "crashed" after a checkpoint at step 4
        first.log(_record(step), step)
    first.finish(exit_code=1)
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()

    resumed = _tracker(tmp_path, resume=True)
    for step in range(5, 9):  # the loop replays 5 and 6 from the checkpoint
        resumed.log(_record(step), step)
    resumed.log(_record(3), 3)  # going backwards is refused too
    resumed.finish()

    fresh = _tracker(tmp_path, resume=False)  # a run started over from step 0 is a new W&B run
    fresh.log(_record(1), 1)
    fresh.finish()
    new_id = (tmp_path / "wandb" / "run_id").read_text().strip()

    one, two, three = offline_runs(tmp_path)
    assert one.run_id == two.run_id == run_id != new_id == three.run_id
    assert [h["_step"] for h in one.history] == [1, 2, 3, 4, 5, 6] and one.exit_code == 1
    assert [h["_step"] for h in two.history] == [7, 8]
    assert two.history[0]["loss"] == pytest.approx(_record(7)["loss"])
    assert [h["_step"] for h in three.history] == [1]


def test_secrets_reach_no_file(tmp_path, monkeypatch):
    api_key, hf_token, cli_token = "wbkey" + "7" * 35, "hf_envtoken_424242", "cli-typed-secret-999"
    monkeypatch.setenv("WANDB_API_KEY", api_key)  # would mean online: mode is forced offline
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setattr(sys, "argv", ["train", f"+tracking.settings.api_key={cli_token}",
                                      f"tracking.notes={hf_token}"])
    config = {**CONFIG, "tracking": {"settings": {"api_key": cli_token}, "notes": hf_token}}
    tracker = _tracker(tmp_path, config=config, notes=hf_token, settings={"api_key": cli_token})
    tracker.log(_record(1), 1)
    tracker.finish()

    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (api_key, hf_token, cli_token):
                assert secret.encode() not in data, f"{secret} leaked into {path}"
    (run,) = offline_runs(tmp_path)
    assert run.config["tracking"] == {"settings": {"api_key": REDACTED}, "notes": REDACTED}
    assert run.config["runtime"]["argv"] == [f"+tracking.settings.api_key={REDACTED}",
                                             f"tracking.notes={REDACTED}"]
    assert [h["_step"] for h in run.history] == [1]


def test_disabled_mode_writes_nothing(tmp_path):
    tracker = _tracker(tmp_path, mode="disabled")
    assert isinstance(tracker, NullTracker)
    tracker.log(_record(1), 1)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_other_ranks_start_no_wandb_and_write_nothing(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from train.tracking import TrackingConfig, build_tracker\n"
        f"run = Path({str(tmp_path)!r})\n"
        "t = build_tracker(TrackingConfig(kind='wandb', mode='offline'), run_dir=run, rank=1,\n"
        "                  world_size=2, config={'a': 1}, resume=True)\n"
        "t.log({'loss': 1.0}, 1); t.log_export(run, {'step': 1}); t.alert('a', 'b'); t.finish()\n"
        "assert 'wandb' not in sys.modules, 'rank 1 imported wandb'\n"
        "assert list(run.iterdir()) == [], list(run.iterdir())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training_outlives_a_dead_wandb_process(tmp_path):
    """Ctrl-C or a SLURM signal can kill wandb-core before the trainer's graceful checkpoint
    logs its timing: W&B goes quiet with one warning, the trainer's calls keep working."""
    code = (
        "import os, signal, psutil\n"
        "from train.tracking import TrackingConfig, build_tracker\n"
        f"t = build_tracker(TrackingConfig(kind='wandb', mode='offline', system_stats=False), run_dir={str(tmp_path)!r},\n"
        "                  rank=0, world_size=1, config={}, resume=False)\n"
        "t.log({'loss': 2.0}, 1)\n"
        "children = psutil.Process().children(recursive=True)\n"
        "for child in children:\n"
        "    try: os.kill(child.pid, signal.SIGKILL)\n"
        "    except ProcessLookupError: pass\n"
        "psutil.wait_procs(children, timeout=30)\n"
        "t.log({'loss': 1.9}, 2); t.log({'checkpoint_time_s': 0.1}, 2)\n"
        f"t.log_export({str(tmp_path)!r}, {{'step': 2}}); t.finish()\n"
        "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.count("W&B logging is off for the rest of this run") == 1, proc.stderr[-3000:]
