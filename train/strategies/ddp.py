"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn

from train.config import Config
from train.dist import DistInfo
from train.loss import token_loss_sum
from train.model_weights import Weights, is_meta, materialize_full, require_weights
from train.startup import NULL, Phases
from train.strategies.base import (
    LossFn,
    TorchOptim,
    autocast,
    compute_dtype,
    forward_only,
    token_scale,
)
from train.strategies.parallelize import apply_block_transforms, apply_ddp, apply_frozen_upcast, saves_low


class DDPStrategy:
    needs_process_group = False  # one process trains the plain model; torchrun's ranks get a group anyway

    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                 weights: Weights | None = None, phases: Phases | None = None) -> None:
        self.cfg, self.device, self.world_size = cfg.strategy, info.device, info.world_size
        self.compute_dtype = compute_dtype(cfg, info.device)
        self.loss_kind = cfg.trainer.loss
        if is_meta(model):  # every rank keeps the whole model: one copy, each tensor read once
            with (phases or NULL).phase("load"):
                materialize_full(model, require_weights(weights), info.device)
        apply_block_transforms(model, cfg.trainer)
        apply_frozen_upcast(model, self.compute_dtype, saved_low=saves_low(cfg.trainer))
        self.model = apply_ddp(model, info)
        self.optim = TorchOptim(model, cfg)
        self.step, self.lr, self.save, self.load = self.optim.step, self.optim.lr, self.optim.save, self.optim.load
        self.clip_grads, self.state_tensors = self.optim.clip_grads, self.optim.state_tensors
        self.save_async = self.optim.save_async

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool, num_tokens: int,
                         loss_fn: LossFn | None = None) -> torch.Tensor:
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if (no_sync is not None and not sync_grads) else contextlib.nullcontext():
            with autocast(self.device, self.compute_dtype):
                loss = loss_fn(self.model, batch) if loss_fn else token_loss_sum(self.model, batch, self.loss_kind).sum
            (loss * token_scale(num_tokens, self.world_size)).backward()
        return loss.detach()

    def forward_context(self) -> ContextManager[None]:
        return forward_only(self.model, autocast(self.device, self.compute_dtype))

    def describe(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "kind": "ddp"}
