"""Experiment tracking: a W&B run that survives resumes, or nothing at all (tracking=none).

The loop calls the same four methods on every rank; only rank 0 of tracking=wandb creates a
W&B run, every other rank gets a NullTracker that starts no process and writes no file.
The W&B-free helpers live next door: `flops` (MFU), `straggler`, `progress`, `redact`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from train.tracking.config import TrackingConfig

if TYPE_CHECKING:  # watch imports torch; train.config imports this package for its schema
    from train.tracking.watch import Watch

log = logging.getLogger("scaletrain.tracking")

__all__ = ["NullTracker", "Tracker", "TrackingConfig", "build_tracker"]


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        """Log one record at trainer step `step`; returns extra keys it added (alert counters,
        `sys/*` memory) that the caller may also write to metrics.jsonl."""

    def log_export(self, path: str | Path, metadata: dict[str, Any]) -> None:
        """Record an export directory (W&B: a model artifact by reference)."""

    def alert(self, title: str, text: str) -> None:
        """Warn loudly (W&B online: also a W&B alert)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; safe to call twice."""


class NullTracker:
    """Tracker of ranks != 0 and of tracking=none.

    With `watch` (rank 0 of tracking=none) it still warns about NaN/spiking losses and
    returns memory figures; without it (other ranks) it does nothing at all.
    """

    def __init__(self, watch: "Watch | None" = None) -> None:
        self.watch = watch

    def log(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        if self.watch is None:
            return {}
        extra, alert = self.watch.observe(metrics, step)
        if alert is not None:
            self.alert(alert.title, alert.text)
        return extra

    def log_export(self, path: str | Path, metadata: dict[str, Any]) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        if self.watch is not None:
            log.warning("%s: %s", title, text)

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_tracker(cfg: TrackingConfig, *, run_dir: Path | str, rank: int, world_size: int,
                  config: dict[str, Any], resume: bool) -> Tracker:
    """The tracker for this rank; call on every rank, then `log`/`finish` on every rank.

    `config` is the resolved training config (it is redacted again before W&B sees it);
    `resume` says whether the loop restored a checkpoint, which decides whether the W&B run
    stored in RUN_DIR/wandb/run_id is continued or a new one begins.
    """
    if rank != 0:
        return NullTracker()
    from train.tracking.watch import Watch

    if cfg.kind == "none":
        return NullTracker(Watch(cfg))
    if cfg.kind != "wandb":
        raise ValueError(f"tracking.kind={cfg.kind!r}: use tracking=wandb or tracking=none")
    from train.tracking.wandb_tracker import WandbTracker, resolve_mode

    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        log.info("tracking.mode=disabled: no W&B run")
        return NullTracker(Watch(cfg))
    return WandbTracker(cfg, run_dir=Path(run_dir), config=config, resume=resume,
                        world_size=world_size, mode=mode)
