"""Losing the data source is a stop, not a crash.

When the loader gives up on a source (its retries exhausted: `DataSourceLost`, raised in the
training process or carried out of a DataLoader worker), or meets a shard that cannot be read
(`data.on_error=raise`: e.g. its bytes changed since the manifest), every rank must stop at the
same step, or the others would wait in the step's collectives. The ranks agree without a
collective of their own: `StepFetcher.fetch` gives a rank that lost its source its previous
step's micro-batches to stand in, so that it runs the step's forward, backward and collectives
like the others, and its flag travels in the step's second all-reduce (train/step.py). Every
rank then sees the loss in the step's one host read, applies no update, and the loop stops:
`agree_on_loss` (collectives only on this path) takes the first rank's reason and puts the
loader back where the step began, so that the checkpoint of the last completed step resumes
exactly. A process's first step has no previous batch to stand in, so it agrees in one tiny
all-reduce of its own (once per process). `stop_message` is the one line the user sees, and
`report_for_launcher` puts it where torchrun's failure summary shows it.

The loader's `state_dict()` is taken before every step (a dict of a few ints, microseconds):
a loss shows only after some ranks took the step's batches, and there is no way back to the
step's start other than the state from before it.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from data_pipeline.read.table import ShardError
from data_pipeline.shards.format import ShardFormatError
from data_pipeline.storage.backends import DataSourceLost
from train import dist as d
from train.step import next_micro_batches


class DataSourceStop(RuntimeError):
    """The run stopped because its data source is gone; the message is one line (exit 1)."""


@dataclass
class StepData:
    """A step's input on one rank."""
    micro_batches: list[dict[str, torch.Tensor]]
    wait: float
    """Seconds spent waiting for the data."""
    lost: str | None = None
    """This rank's reason when its source is lost: `micro_batches` are then its previous step's,
    standing in so that the step's collectives match."""
    lost_everywhere: bool = False
    """The first step's own agreement found a loss on some rank: there is no step to run."""
    before: dict[str, Any] | None = None
    """The loader's state at the step's start (None: nothing to lose)."""


class StepFetcher:
    """The step's micro-batches, or a stand-in when the source is lost (see the module docstring)."""

    def __init__(self, batches: Iterator[dict[str, Any]], loader: Any, accum: int, device: torch.device) -> None:
        self.batches, self.loader, self.accum, self.device = batches, loader, accum, device
        self.reads_storage = getattr(loader, "reads_storage", True)  # synthetic data: nothing to lose
        self.stand_in: list[dict[str, torch.Tensor]] | None = None

    def fetch(self) -> StepData:
        if not self.reads_storage:
            return StepData(*next_micro_batches(self.batches, self.accum, self.device))
        before = self.loader.state_dict()
        reason: str | None = None
        try:
            micro_batches, wait = next_micro_batches(self.batches, self.accum, self.device)
        except DataSourceLost as e:
            micro_batches, wait, reason = [], 0.0, f"data source lost: {e.url}: {e.error}"
        except (ShardFormatError, ShardError) as e:  # a shard whose bytes changed since its manifest...
            micro_batches, wait, reason = [], 0.0, last_line(e)
        if self.stand_in is None and d.any_rank(reason is not None, self.device):  # first step only
            return StepData([], 0.0, reason, lost_everywhere=True, before=before)
        if reason is not None:
            return StepData(self.stand_in, wait, reason, before=before)
        self.stand_in = micro_batches
        return StepData(micro_batches, wait, before=before)


def agree_on_loss(data: StepData, loader: Any) -> str:
    """Collective, once every rank knows that some rank lost its source: the first rank's reason
    on every rank, and the loader back at the step's start (the micro-batches taken this step
    are read again on resume)."""
    reason = next(r for r in d.all_gather_object(data.lost) if r)
    loader.load_state_dict(data.before)
    return reason


def last_line(e: BaseException) -> str:
    """The exception's own message; from a DataLoader worker (which re-raises `type(e)(its whole
    traceback text)`), the last line of that traceback without the class name."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return " ".join(text.split())
    line = text.splitlines()[-1]
    name = f"{type(e).__name__}: "
    return line.split(name, 1)[-1] if name in line else line


def resume_command() -> str:
    """The command that started this rank's run: torchrun's own command line under torchrun."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
            if args:
                return shlex.join(args)
        except OSError:
            pass
        return "torchrun ... -m train " + shlex.join(sys.argv[1:])
    return shlex.join(["python", "-m", "train", *sys.argv[1:]])


def stop_message(reason: str, step: int, checkpoint: Path | None) -> str:
    """One line: what was lost (the URL, the HTTP status or error), the step, the checkpoint, and
    the command that resumes."""
    saved = (f"checkpointed step {step} ({checkpoint})" if checkpoint else
             "no step was completed" if step == 0 else f"step {step} was NOT checkpointed (see the error above)")
    return (f"stopped before step {step + 1}: {reason}; {saved}. Once the data is back, resume with the same "
            f"command: {resume_command()}")


def report_for_launcher(message: str) -> None:
    """torchrun prints its own failure summary after the ranks exit; the rank's error file
    (TORCHELASTIC_ERROR_FILE, its `record` format) makes the summary's root cause this line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
            Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))
        except OSError:
            pass
