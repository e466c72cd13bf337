"""One fault-injection seam, for tests that need a real crash at an exact point.

`SCALETRAIN_FAULT=POINT[@VALUE][,POINT[@VALUE]...]` makes the process SIGKILL itself when the
code reaches `hit(POINT, VALUE)`. Points: `checkpoint.publish@STEP` (every rank's shards are
written, the checkpoint is not yet published), `export.write` and `export.publish` (the
exporter, before and between its renames). Unset in normal runs: a dictionary lookup per call.

Two points fail instead of killing: `nan@STEP` (or `nan@STEP/RANK`) makes the training loss of
step STEP NaN (on every rank, or on RANK only), once per process, through a forward hook on
the model; `checkpoint.enospc@STEP` makes the checkpoint of step STEP fail with ENOSPC on every
rank, as a full disk does. `delay@SECONDS` slows every training forward by SECONDS without
changing any number (a slower model: tests that must signal a run mid-way, e.g. SLURM requeues).
"""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import Callable

from torch import nn

ENV = "SCALETRAIN_FAULT"


def hit(point: str, value: object = None) -> None:
    """SIGKILL this process if SCALETRAIN_FAULT names `point` (with `value`, when one is given)."""
    if armed(point, value):
        os.kill(os.getpid(), signal.SIGKILL)


def armed(point: str, value: object = None) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    here = point if value is None else f"{point}@{value}"
    return here in (s.strip() for s in spec.split(","))


def fail_enospc(point: str, value: object, path: object) -> None:
    """Raise the OSError a full disk raises while writing `path`, if armed."""
    if armed(point, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def poison_loss(model: nn.Module, current_step: Callable[[], int]) -> None:
    """If `nan@...` points are armed, make the hidden states (so the loss and every gradient) NaN in
    training forwards of those steps (through the final norm's output), once per step number (a rollback replays it cleanly)."""
    spec = os.environ.get(ENV, "")
    _delay_forwards(model, spec)
    if "nan@" not in spec:
        return
    rank, fired = os.environ.get("RANK", "0"), set()

    def hook(module: nn.Module, args, output):
        step = current_step()
        if module.training and step not in fired and (armed("nan", step) or armed("nan", f"{step}/{rank}")):
            fired.add(step)
            return output * float("nan")
        return output

    # The final norm's output feeds every loss mode (plain logits or the chunked/fused projection).
    final_norm = [m for name, m in model.named_modules() if name.endswith("norm")][-1]
    final_norm.register_forward_hook(hook)


def _delay_forwards(model: nn.Module, spec: str) -> None:
    """`delay@SECONDS`: sleep that long before every training forward of the model."""
    seconds = [float(p.split("@", 1)[1]) for p in spec.split(",") if p.startswith("delay@")]
    if seconds:
        model.register_forward_pre_hook(lambda m, args: time.sleep(seconds[0]) if m.training else None)
