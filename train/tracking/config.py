"""Typed settings of the tracking group (`conf/tracking/*.yaml`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrackingConfig:
    """Experiment tracking. `kind=none` logs only to metrics.jsonl and the console."""

    kind: str = "none"
    """`wandb` or `none`."""
    mode: str = "offline"
    """W&B mode: online, offline or disabled."""
    project: str = "scaletrain"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU; null = look the device up in the table of known GPUs."""

    def validate(self) -> list[str]:
        problems = []
        if self.kind not in ("wandb", "none"):
            problems.append(f"tracking.kind={self.kind!r}: use tracking=wandb or tracking=none")
        if self.mode not in ("online", "offline", "disabled"):
            problems.append(f"tracking.mode={self.mode!r}: use online, offline or disabled")
        return problems
