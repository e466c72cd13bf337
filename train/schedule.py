"""Learning-rate schedules as LambdaLR multipliers (so every engine can step them the same way)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from train.config import ScheduleConfig


def lr_lambda(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    warmup = max(cfg.warmup_steps, 0) or math.ceil(cfg.warmup_ratio * max_steps)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if cfg.kind == "linear":  # transformers' get_linear_schedule_with_warmup when min_lr_ratio=0
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         cfg) -> None:
    """After a resume, make the current config's optimizer and schedule settings win.

    `optimizer.load_state_dict` restores the saved lr, betas, eps and weight decay of every
    group and `LambdaLR.load_state_dict` the saved base LRs, so without this a new `optim.lr`
    (or warmup, max_steps...) would be silently ignored. The schedule position (last_epoch)
    and the Adam moments stay as saved. Group 0 is the weight-decayed one (param_groups()).
    """
    o = cfg.optim
    fn = lr_lambda(cfg.schedule, cfg.trainer.max_steps)
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [fn] * len(optimizer.param_groups)
    for i, group in enumerate(optimizer.param_groups):
        group.update(initial_lr=o.lr, lr=o.lr * fn(scheduler.last_epoch), betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay if i == 0 else 0.0)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
