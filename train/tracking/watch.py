"""What rank 0 adds to every training record, whichever tracker is active."""
from __future__ import annotations

from typing import Any

from train.tracking.alerts import LossAlert, LossMonitor
from train.tracking.config import TrackingConfig
from train.tracking.system import memory_metrics


class Watch:
    """Loss alerts and host/GPU memory for records that carry a training `loss`."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.monitor = LossMonitor(cfg.loss_spike_factor, cfg.loss_spike_window) if cfg.alerts else None
        self.system = cfg.system_metrics

    def observe(self, metrics: dict[str, Any], step: int) -> tuple[dict[str, Any], LossAlert | None]:
        """Extra keys to log with `metrics`, and the alert to raise (if any)."""
        if "loss" not in metrics:  # eval, checkpoint and export records
            return {}, None
        extra: dict[str, Any] = {}
        alert = None
        if self.monitor is not None:
            alert = self.monitor.check(step, metrics["loss"], judged=bool(metrics.get("skipped")))
            extra.update(self.monitor.metrics())
        if self.system:
            extra.update(memory_metrics())
        return extra, alert
