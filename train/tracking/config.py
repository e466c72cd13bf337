"""Typed settings of the tracking group (`conf/tracking/*.yaml`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class TrackingConfig:
    """Experiment tracking. `kind=none` logs only to metrics.jsonl and the console.

    The W&B-free helpers (MFU, straggler detection, progress bar, loss alerts) read their
    settings from here too, so they work with either kind.
    """

    kind: Literal["wandb", "none"] = "none"
    """`wandb` or `none`."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B mode: auto (online when WANDB_API_KEY is set, else offline; WANDB_MODE wins), online,
    offline or disabled."""
    project: str = "scaletrain"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    """W&B display name; null = run.name."""
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    run_id: str | None = None
    """Force the W&B run id; null = the id kept in RUN_DIR/wandb/run_id (a new one on a fresh run)."""
    console: Literal["off", "auto", "wrap", "redirect"] = "off"
    """W&B console capture (off, auto, wrap, redirect). Off by default: captured output could
    hold secrets that a program prints."""
    system_stats: bool = True
    """W&B's own sampler of CPU/GPU utilisation (rank 0's node)."""
    system_metrics: bool = True
    """Add host and GPU memory (`sys/*` keys) to every logged step."""
    log_exports: bool = True
    """Log each export as a W&B model artifact that references the export directory (no upload)."""
    export_checksum: bool = False
    """Hash every exported file for the artifact (slow for large models); false = path only."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of wandb.Settings (e.g. base_url for a self-hosted server)."""
    init_timeout_s: float = 90.0
    """How long wandb.init may take online before the run falls back to offline."""
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU; null = look the device up in the table of known GPUs."""
    alerts: bool = True
    """Warn (and wandb.alert online) when the loss is NaN/inf or spikes."""
    loss_spike_factor: float = 2.0
    """A loss above this multiple of the median of recent losses counts as a spike."""
    loss_spike_window: int = 50
    """Recent logged losses the median is taken over (alerts start after 10)."""
    alert_wait_s: float = 300.0
    """Minimum seconds between two W&B alerts with the same title."""
    straggler_every: int = 100
    """Compare step and data-wait times of all ranks every N steps (0 = never)."""
    straggler_margin: float = 0.2
    """A rank slower than the median by this fraction of a step is reported."""
    progress: bool = True
    """Progress bar on rank 0 (plain log lines when the output is not a terminal)."""
    progress_every_s: float = 30.0
    """Seconds between plain progress lines when the output is not a terminal."""

    def validate(self) -> list[str]:
        p = []
        if self.run_id is not None and not _RUN_ID.match(str(self.run_id)):
            p.append(f"tracking.run_id={self.run_id!r}: use 1-64 letters, digits, '-' or '_'")
        if not all(isinstance(t, str) for t in self.tags):
            p.append(f"tracking.tags={self.tags!r}: expected a list of strings")
        if self.peak_flops is not None and not self.peak_flops > 0:
            p.append(f"tracking.peak_flops={self.peak_flops}: must be > 0 (FLOP/s, e.g. 989e12) or null")
        if not self.loss_spike_factor > 1:
            p.append(f"tracking.loss_spike_factor={self.loss_spike_factor}: must be > 1")
        if self.loss_spike_window < 2:
            p.append(f"tracking.loss_spike_window={self.loss_spike_window}: must be >= 2")
        if self.straggler_every < 0:
            p.append(f"tracking.straggler_every={self.straggler_every}: must be >= 0 (0 = off)")
        if not self.straggler_margin > 0:
            p.append(f"tracking.straggler_margin={self.straggler_margin}: must be > 0 (e.g. 0.2)")
        if not self.init_timeout_s > 0:
            p.append(f"tracking.init_timeout_s={self.init_timeout_s}: must be > 0")
        if self.kind == "wandb" and self.settings:
            p.extend(_check_settings(self.settings))
        return p


def _check_settings(settings: dict[str, Any]) -> list[str]:
    """Unknown wandb.Settings keys fail here, before any process group starts, not in wandb.init."""
    try:
        import wandb
    except ImportError:
        return ["tracking=wandb needs the wandb package: pip install wandb"]
    known = set(wandb.Settings.model_fields)
    return [f"tracking.settings.{k}: not a wandb.Settings field (see "
            "https://docs.wandb.ai/ref/python/settings)" for k in settings if k not in known]
