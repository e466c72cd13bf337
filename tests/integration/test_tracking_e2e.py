"""Through the real trainer: an offline W&B run that survives a crash-and-resume, leaks no secret,
and whose metrics match metrics.jsonl; the report renders from the same run directory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, losses
from tests.support.wandb_offline import offline_runs
from train.report import write_report

API_KEY, HF_TOKEN, CLI_TOKEN = "wbkey" + "5" * 35, "hf_e2e_token_31337", "cli-e2e-secret-2718"


def _train(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # start an own wandb-core
    # A W&B key would mean online mode: the test forces tracking.mode=offline (there is no network).
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
                "WANDB_API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN})
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"



@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_wandb_resume_and_secrets(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "tracking=wandb", "tracking.mode=offline", f"run.dir={run_dir}",
            f"+tracking.settings.api_key={CLI_TOKEN}", "tracking.notes=${oc.env:HF_TOKEN}",
            "checkpoint.every_steps=2", "checkpoint.at_end=false"]
    # First attempt logs steps 1-3 but its last checkpoint is step 2: as if killed after step 3.
    _train([*args, "trainer.max_steps=3"])
    first_losses = losses(run_dir)
    _train([*args, "trainer.max_steps=5"])  # resumes at 2, replays 3, runs 4-5
    final_losses = losses(run_dir)

    one, two = offline_runs(run_dir)
    assert one.run_id == two.run_id == (run_dir / "wandb" / "run_id").read_text().strip()
    assert {h["_step"]: h["loss"] for h in one.history if "loss" in h} == pytest.approx(first_losses)
    assert [h["_step"] for h in two.history] == [4, 5]  # the replayed step 3 is not logged twice
    assert {h["_step"]: h["loss"] for h in two.history} == pytest.approx(
        {s: final_losses[s] for s in (4, 5)})
    for key in ("tokens_per_s", "data_wait_frac", "step_time_s", "sys/host_rss_gb", "alerts/loss_spike"):
        assert key in two.history[-1]
    assert one.config["trainer"]["max_steps"] == 3 and two.config["trainer"]["max_steps"] == 5
    assert two.config["tracking"]["notes"] == "***REDACTED***"

    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (API_KEY, HF_TOKEN, CLI_TOKEN):
                assert secret.encode() not in data, f"{secret} leaked into {path}"

    report = write_report(run_dir)
    assert (report / "loss.png").stat().st_size > 10_000 and "| final loss |" in (report / "summary.md").read_text()
