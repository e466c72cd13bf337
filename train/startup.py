"""Start-up you can see: the time and peak host memory of each start-up phase.

The trainer times `build` (the module tree on the meta device, the adapter), `load` (each rank
materializes and fills what it keeps), `engine` (the rest of the strategy's set-up: wrapping,
optimizer) and `first_step`; rank 0 logs them and writes one `startup` record to metrics.jsonl:

    {"step": S, "startup": {"build_s", "load_s", "engine_s", "first_step_s", "total_s",
                            "peak_rss_bytes_before_first_step", "peak_rss_bytes_after_first_step",
                            "rank_peak_rss_bytes_before_first_step": [per rank],
                            "rank_peak_rss_bytes_after_first_step": [per rank],
                            "phase_peak_rss_bytes": {"build": .., "load": .., "engine": ..},
                            "reference": {...}}}   (objective=dpo with a frozen reference model only)

Peak RSS is the process's high-water mark so far (getrusage ru_maxrss), so a phase's figure is the
peak up to its end; the `peak_rss_bytes_*` values are the maximum over ranks. `engine_s` excludes
`load_s`. Phases that a run skips (qlora loads inside `build`) report 0.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from typing import Any, Iterator

log = logging.getLogger("scaletrain")
PHASES = ("build", "load", "engine", "first_step")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Phases:
    """Seconds and peak RSS per start-up phase; nested phases are subtracted from their parent."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.peak: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self._open: list[str] = []
        self.notes: dict[str, Any] = {}
        """Extra entries of the `startup` record (DPO's `reference`: what each rank holds of it)."""

    @contextlib.contextmanager
    def phase(self, name: str, part: str | None = None) -> Iterator[None]:
        """Time `name` (a phase may be entered more than once; its figures add up); `part` names
        this entry in the log line."""
        t0 = time.perf_counter()
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            if self._open:  # a nested phase's time is not its parent's
                self.seconds[self._open[-1]] -= took
            self.peak[name] = peak_rss_bytes()
            log.info("start-up: %s took %.2f s (peak host memory %.2f GiB)", f"{name} ({part})" if part else name,
                     took, self.peak[name] / 2**30)

    def record(self, rank_peaks_before: list[int], rank_peaks_after: list[int]) -> dict[str, Any]:
        """The `startup` record (the per-rank peaks gathered by the caller, collective)."""
        out: dict[str, Any] = {f"{k}_s": round(v, 4) for k, v in self.seconds.items()}
        out["total_s"] = round(time.perf_counter() - self.t0, 4)
        out["peak_rss_bytes_before_first_step"] = max(rank_peaks_before)
        out["peak_rss_bytes_after_first_step"] = max(rank_peaks_after)
        out["rank_peak_rss_bytes_before_first_step"] = rank_peaks_before
        out["rank_peak_rss_bytes_after_first_step"] = rank_peaks_after
        out["phase_peak_rss_bytes"] = {k: v for k, v in self.peak.items() if k != "first_step"}
        return {**out, **self.notes}


NULL = Phases()  # what strategies built outside the trainer (tests, benches) time into


def trainable_summary(adapter: str, r: int, model: Any) -> str:
    """`lora r=16: 6.8M trainable of 8.03B` (or `full: 8.03B trainable of 8.03B`)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = f"{adapter} r={r}" if adapter != "none" else "full"
    return f"{head}: {_count(trainable)} trainable of {_count(total)}"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)
