"""Learning-rate schedules as LambdaLR multipliers (so every engine can step them the same way)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from train.config import ScheduleConfig


def lr_lambda(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    warmup = max(cfg.warmup_steps, 0)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
