"""A progress bar for rank 0 that turns into plain log lines when nobody watches a terminal.

The bar is drawn when its stream (stderr by default) is a terminal. Under SLURM or with
output piped to a file a tqdm bar would write one carriage-return frame
per update into the log; instead a line with the same facts is printed every `every_s`
seconds and at the end.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def _fmt_rate(tokens_per_s: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{unit} tok/s"
    return f"{tokens_per_s:.0f} tok/s"


class Progress:
    """Step progress with loss, tokens/s and ETA; a no-op when `enabled` is false (ranks != 0).

    `unit` and `desc` let other commands (prepare, export) reuse it for their own counts.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *,
                 every_s: float = 30.0, stream: TextIO | None = None, desc: str = "train",
                 unit: str = "step") -> None:
        self.total, self.start_step, self.step = total_steps, initial_step, initial_step
        self.enabled, self.every_s, self.desc, self.unit = enabled, every_s, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self._last_line = -math.inf
        self._printed_step: int | None = None
        self._last_metrics: dict[str, Any] = {}
        self.bar = None
        if enabled and _isatty(self.stream):
            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit=unit,
                            file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def eta_s(self) -> float:
        """Seconds left at this session's average pace (resumed steps do not count)."""
        done, elapsed = self.step - self.start_step, time.monotonic() - self.t0
        if done <= 0:
            return math.inf
        return max(0, self.total - self.step) * elapsed / done

    def describe(self, metrics: dict[str, Any]) -> dict[str, str]:
        parts = {}
        loss = metrics.get("loss")
        if loss is not None:
            parts["loss"] = f"{loss:.4f}" if isinstance(loss, float) else str(loss)
        if metrics.get("tokens_per_s"):
            parts["speed"] = _fmt_rate(float(metrics["tokens_per_s"]))
        return parts

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        """Move to `step` (absolute); `metrics` may carry loss and tokens_per_s."""
        if not self.enabled:
            return
        if metrics:
            self._last_metrics = {**self._last_metrics, **metrics}
        advance, self.step = step - self.step, step
        if self.bar is not None:
            if metrics:
                self.bar.set_postfix(self.describe(self._last_metrics), refresh=False)
            self.bar.update(advance)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or step >= self.total:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        self._printed_step = self.step
        pct = 100.0 * self.step / self.total if self.total else 100.0
        fields = [f"{self.desc} {self.unit} {self.step}/{self.total} ({pct:.1f}%)"]
        fields += [v if k == "speed" else f"{k} {v}" for k, v in self.describe(self._last_metrics).items()]
        fields += [f"elapsed {_fmt_duration(time.monotonic() - self.t0)}", f"ETA {_fmt_duration(self.eta_s())}"]
        print(" | ".join(fields), file=self.stream, flush=True)

    def redirect_logging(self) -> contextlib.AbstractContextManager:
        """Route console log lines through the bar while it is shown, so they do not tear it
        (`with progress.redirect_logging(): ...` around the loop); a no-op without a bar."""
        if self.bar is None:
            return contextlib.nullcontext()
        return logging_redirect_tqdm()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self._printed_step != self.step:
            self._print_line()  # where a stopped run ended
        self.enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
