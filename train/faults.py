"""One fault-injection seam, for tests that need a real crash at an exact point.

`SCALETRAIN_FAULT=POINT[@VALUE][,POINT[@VALUE]...]` makes the process SIGKILL itself when the
code reaches `hit(POINT, VALUE)`. Points: `checkpoint.publish@STEP` (every rank's shards are
written, the checkpoint is not yet published), `export.write` and `export.publish` (the
exporter, before and between its renames). Unset in normal runs: a dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

ENV = "SCALETRAIN_FAULT"


def hit(point: str, value: object = None) -> None:
    """SIGKILL this process if SCALETRAIN_FAULT names `point` (with `value`, when one is given)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    here = point if value is None else f"{point}@{value}"
    if here in (s.strip() for s in spec.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)
