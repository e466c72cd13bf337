"""Losing the data source is a stop, not a crash.

When the loader gives up on a source (its retries exhausted: `DataSourceLost`, raised in the
training process or carried out of a DataLoader worker), or meets a shard that cannot be read
(`data.on_error=raise`: e.g. its bytes changed since the manifest), every rank must stop at the same step,
or the others would wait in the step's collectives. `fetch_step` takes a step's micro-batches
and lets the ranks agree (one tiny all-reduce per step; the message only on a loss); on a loss
the loader is put back where the step began, so that the checkpoint of the last completed step
resumes exactly. `stop_message` is the one line the user sees, and `report_for_launcher` puts it
where torchrun's failure summary shows it.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
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


def fetch_step(batches: Iterator[dict[str, Any]], loader: Any, accum: int,
               device: torch.device) -> tuple[list[dict[str, torch.Tensor]], float, str | None]:
    """Collective: the step's micro-batches and data wait, or, when any rank lost its source or met
    a bad shard (data.on_error=raise), the first rank's reason on every rank and the loader back at
    the step's start (the micro-batches taken this step are read again on resume)."""
    if not getattr(loader, "reads_storage", True):  # synthetic data: nothing to lose, no collective
        micro_batches, wait = next_micro_batches(batches, accum, device)
        return micro_batches, wait, None
    before = loader.state_dict()
    reason: str | None = None
    try:
        micro_batches, wait = next_micro_batches(batches, accum, device)
    except DataSourceLost as e:
        micro_batches, wait, reason = [], 0.0, f"data source lost: {e.url}: {e.error}"
    except (ShardFormatError, ShardError) as e:  # a shard whose bytes changed since its manifest...
        micro_batches, wait, reason = [], 0.0, last_line(e)
    if not d.any_rank(reason is not None, device):
        return micro_batches, wait, None
    reason = next(r for r in d.all_gather_object(reason) if r)
    loader.load_state_dict(before)
    return [], 0.0, reason


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
