"""Loss watchdog: notices a NaN/inf loss or a sudden spike, free of any tracker."""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class LossAlert:
    kind: str
    """`nonfinite` or `spike`."""
    title: str
    text: str


class LossMonitor:
    """Checks each logged loss against the median of the recent finite ones.

    Counts every event (`alerts/loss_nonfinite`, `alerts/loss_spike`) but reports an event kind
    at most once per `quiet_steps`, so a run stuck at NaN does not print a warning per step.
    """

    MIN_HISTORY = 10

    def __init__(self, spike_factor: float = 2.0, window: int = 50, quiet_steps: int = 100) -> None:
        self.spike_factor, self.quiet_steps = spike_factor, quiet_steps
        self.recent: deque[float] = deque(maxlen=window)
        self.counts = {"nonfinite": 0, "spike": 0}
        self._last_report: dict[str, int] = {}

    def check(self, step: int, loss: float | None, judged: bool = False) -> LossAlert | None:
        """The alert to raise for this step's loss, or None. `judged`: the NaN guard skipped this
        step and has already said why (train/guard.py): the event is counted, not announced
        again (one voice per event), and the loss stays out of the spike history."""
        if loss is None:  # metrics.jsonl stores a NaN loss as null
            loss = float("nan")
        loss = float(loss)
        if judged:
            self.counts["nonfinite" if not math.isfinite(loss) else "spike"] += 1
            return None
        if not math.isfinite(loss):
            return self._event("nonfinite", step, f"loss is {loss} at step {step}",
                               f"Training loss became {loss} at step {step}. Check the LR, data and "
                               "grad clipping; resume from the last good checkpoint.")
        alert = None
        if len(self.recent) >= self.MIN_HISTORY:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.spike_factor * median:
                alert = self._event("spike", step, f"loss spike at step {step}",
                                    f"Loss {loss:.4g} at step {step} is {loss / median:.1f}x the median "
                                    f"{median:.4g} of the last {len(self.recent)} logged steps.")
        self.recent.append(loss)
        return alert

    def _event(self, kind: str, step: int, title: str, text: str) -> LossAlert | None:
        self.counts[kind] += 1
        last = self._last_report.get(kind)
        if last is not None and 0 <= step - last < self.quiet_steps:
            return None
        self._last_report[kind] = step
        return LossAlert(kind, title, text)

    def metrics(self) -> dict[str, int]:
        """Cumulative event counters (this session), as logged keys."""
        return {f"alerts/loss_{k}": v for k, v in self.counts.items()}
