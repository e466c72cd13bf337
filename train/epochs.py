"""`trainer.epochs`: the step count of a run that trains for passes over its data.

The loop calls `resolve_max_steps` once the loader exists (its manifests know the token and row
counts); the LR schedule, the progress bar and the stop condition all use the result.
"""
from __future__ import annotations

import logging
import math

from data_pipeline import Loader
from train.config import TrainerConfig

log = logging.getLogger("scaletrain")


def resolve_max_steps(t: TrainerConfig, loader: Loader, world_size: int, accum: int) -> int:
    """`trainer.max_steps`, or the steps of `trainer.epochs` passes, rounded up so that every sample
    is seen `epochs` times (packed text: tokens / (global batch x seq_len); chat rows: rows / global
    batch), logged with its derivation."""
    if t.epochs is None:
        assert t.max_steps is not None  # load_config fills the default
        return t.max_steps
    units, unit, counted = loader.epoch_units(t.epochs)
    rows = t.micro_batch_size * accum * world_size
    per_step = rows * (t.seq_len if unit == "tokens" else 1)
    steps = max(1, math.ceil(units / per_step))
    per = f"({rows} x {t.seq_len})" if unit == "tokens" else f"{rows} rows per step"
    log.info("trainer.epochs=%g: %s steps = %s / %s", t.epochs, f"{steps:,}", counted, per)
    return steps
