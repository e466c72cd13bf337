"""Graceful stop: SIGTERM / SIGUSR1 / a first Ctrl-C, a RUN_DIR/STOP file, a dead launcher, or a lost
run lock end the run at the next step boundary; every rank checkpoints that step and exits.

The handlers only set a flag; the loop sends each rank's `local()` answer in the all-reduce it
already makes per step (train/step.py), so every rank checkpoints the same step. Only rank 0 looks at the STOP file,
and at most every `STOP_CHECK_S` seconds (a stat on a shared filesystem per step per rank adds up).
The STOP file works across nodes without forwarding signals through torchrun (which dies on
SIGUSR1); the SLURM script touches it. A STOP file older than this process was left over from an
earlier run: it is removed with a warning, not honoured.

torchrun starts its ranks in sessions of their own, so when torchrun dies (`kill -USR1 <torchrun>`)
nothing tells them: a rank notices that its parent pid changed (one cheap getppid per step),
checkpoints and exits instead of training on as an orphan whose output is lost.

A second Ctrl-C aborts at once: the first one restores the default SIGINT action.

SIGUSR2 prints every thread's Python stack to the rank's stderr and training goes on
(`enable_stack_dumps`, Python's faulthandler): where a hung rank waits, without a debugger.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("scaletrain")

STOP_CHECK_S = 1.0
"""Seconds between two looks at RUN_DIR/STOP by rank 0."""


DUMP_SIGNAL = signal.SIGUSR2
"""`kill -USR2 <rank pid>`: every thread's stack to stderr, then the rank goes on."""


def enable_stack_dumps() -> None:
    """Install the SIGUSR2 handler (faulthandler: async-signal-safe, works while the main thread is
    blocked in a collective or a write)."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


class StopRequest:
    def __init__(self, run_dir: Path, is_main: bool = True, lock=None) -> None:
        self.stop_file = run_dir / "STOP"
        self.is_main = is_main
        self.lock = lock
        self.signal_name: str | None = None
        self.file_seen = False
        self.parent = os.getppid()
        self._next_check = 0.0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)
        if is_main:
            self._drop_stale_stop_file()

    def _drop_stale_stop_file(self) -> None:
        try:
            mtime = self.stop_file.stat().st_mtime
        except OSError:
            return
        if mtime < _process_start():
            log.warning("%s predates this run (left over from an earlier one): removed, not honoured",
                        self.stop_file)
            self.clear()

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
            log.warning("SIGINT: finishing the step, checkpointing and exiting; Ctrl-C again aborts at once "
                        "(losing the steps since the last checkpoint)")

    def _parent_died(self) -> bool:
        return os.getppid() != self.parent

    def local(self) -> bool:
        """This rank's answer: a signal, a dead launcher, a lost lock, or (rank 0, rate-limited) STOP."""
        if self.signal_name is not None or self._parent_died() or (self.lock is not None and self.lock.lost):
            return True
        if self.is_main and not self.file_seen and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + STOP_CHECK_S
            self.file_seen = self.stop_file.exists()
        return self.file_seen

    def reason(self) -> str:
        if self.signal_name:
            return self.signal_name
        if self._parent_died():
            return f"the launcher (parent pid {self.parent}) died"
        if self.lock is not None and self.lock.lost:
            return f"the run lock was taken over by {self.lock.lost}"
        if self.file_seen:
            return f"{self.stop_file} present"
        return "another rank asked"

    def clear(self) -> None:
        try:
            self.stop_file.unlink(missing_ok=True)
        except OSError as e:  # a directory named STOP, say: say so, do not fail the run over it
            log.warning("could not remove %s: %s", self.stop_file, e)
