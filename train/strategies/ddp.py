"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.config import Config
from train.dist import DistInfo
from train.model import lm_loss
from train.schedule import build_scheduler
from train.strategies.base import (adamw, autocast, clip_and_step, compute_dtype,
                                   enable_activation_checkpointing)
from train.strategies.dcp_state import load_dcp, save_dcp


class DDPStrategy:
    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int) -> None:
        self.device, self.accum, self.clip = info.device, accum, cfg.trainer.grad_clip
        self.loss_kind = cfg.trainer.loss
        self.dtype = compute_dtype(cfg, info.device)
        if cfg.trainer.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.to(info.device)
        self.raw = model
        self.model = (DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
                      if dist.is_initialized() and info.world_size > 1 else model)
        self.optimizer = adamw(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.trainer.max_steps)

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool) -> torch.Tensor:
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync_grads) else contextlib.nullcontext()
        with ctx:
            with autocast(self.device, self.dtype):
                loss = lm_loss(self.model, batch, self.loss_kind)
            (loss / self.accum).backward()
        return loss.detach()

    def step(self) -> float:
        return clip_and_step(self.raw, self.optimizer, self.scheduler, self.clip)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: Path) -> None:
        save_dcp(path, self.raw, self.optimizer, self.scheduler)

    def load(self, path: Path, universal: bool = False) -> None:
        load_dcp(path, self.raw, self.optimizer, self.scheduler)
