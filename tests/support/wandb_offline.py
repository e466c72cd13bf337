"""Read the records of offline W&B runs back from RUN_DIR/wandb (tests, debugging).

The supported reader of a `.wandb` transaction log in wandb >= 0.2x is the CLI's
`wandb leet inspect --json FILE` (the old `wandb.sdk.internal.datastore` is gone); it prints
one JSON record per line: run (config), history, summary, artifact, alert, exit, ...
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    path: Path
    """The run-<id>.wandb file."""
    run_id: str = ""
    start_time: str = ""
    """ISO-8601 UTC start of this session."""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per logged step: the metrics plus `_step`."""
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None


def read_records(wandb_file: Path | str) -> list[dict[str, Any]]:
    """Every record of one .wandb file, as `wandb leet inspect --json` prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"wandb leet inspect --json {wandb_file} failed ({out.returncode}; it needs "
                           f"wandb >= 0.30): {out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def read_run(wandb_file: Path | str) -> OfflineRun:
    run = OfflineRun(Path(wandb_file))
    for rec in read_records(wandb_file):
        kind = rec.get("type")
        body = rec.get(kind) or {}
        if kind == "run":
            run.run_id = body.get("run_id", "")
            run.start_time = body.get("start_time", "")
            run.config.update(body.get("config", {}).get("update", {}))
        elif kind == "config":
            run.config.update(body.get("update", {}))
        elif kind == "history":
            run.history.append(body.get("item", {}))
        elif kind == "artifact":
            run.artifacts.append(body)
        elif kind == "alert":
            run.alerts.append(body)
        elif kind == "exit":
            run.exit_code = int(body.get("exit_code", 0))
    run.config.pop("_wandb", None)
    return run


def offline_runs(run_dir: Path | str) -> list[OfflineRun]:
    """All offline W&B sessions under RUN_DIR/wandb, oldest first (one per start or resume)."""
    runs = [read_run(f) for f in Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")]
    return sorted(runs, key=lambda r: (_when(r.start_time), r.path.parent.name))


def _when(iso: str) -> datetime:
    try:
        return datetime.fromisoformat(iso)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
