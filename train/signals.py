"""Graceful stop: SIGTERM / SIGUSR1, or a RUN_DIR/STOP file, end the run at the next step boundary.

The handler only sets a flag; the loop agrees across ranks (one all-reduce) so that every
rank checkpoints the same step. The STOP file works across nodes without forwarding signals
through torchrun (which itself dies on SIGUSR1); the SLURM script touches it.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger("scaletrain")


class StopRequest:
    def __init__(self, run_dir: Path) -> None:
        self.stop_file = run_dir / "STOP"
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local(self) -> bool:
        return self.signal_name is not None or self.stop_file.exists()

    def reason(self) -> str:
        return self.signal_name or f"{self.stop_file} present"

    def clear(self) -> None:
        self.stop_file.unlink(missing_ok=True)
