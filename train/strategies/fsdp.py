"""PyTorch FSDP2: `fully_shard` on every decoder block, then on the root (torchtitan's recipe)."""
from __future__ import annotations

from typing import Any, ContextManager

import torch
from torch import nn

from train.config import Config
from train.dist import DistInfo
from train.loss import token_loss_sum
from train.model_weights import Weights
from train.startup import Phases
from train.strategies.base import LossFn, TorchOptim, compute_dtype, forward_only, token_scale
from train.strategies.parallelize import apply_block_transforms, apply_fsdp, saves_low


class FSDPStrategy:
    needs_process_group = True  # the device mesh needs one, even on a single process

    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                 weights: Weights | None = None, phases: Phases | None = None) -> None:
        self.cfg, self.world_size = cfg.strategy, info.world_size
        self.compute_dtype = compute_dtype(cfg, info.device)
        self.loss_kind = cfg.trainer.loss
        apply_block_transforms(model, cfg.trainer)
        self.model = apply_fsdp(model, cfg.strategy, info, self.compute_dtype, weights, phases,
                                saved_low=saves_low(cfg.trainer))
        self.optim = TorchOptim(self.model, cfg)
        self.step, self.lr, self.save, self.load = self.optim.step, self.optim.lr, self.optim.save, self.optim.load
        self.clip_grads, self.state_tensors = self.optim.clip_grads, self.optim.state_tensors
        self.save_async = self.optim.save_async

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool, num_tokens: int,
                         loss_fn: LossFn | None = None) -> torch.Tensor:
        self.model.set_requires_gradient_sync(sync_grads)
        # MixedPrecisionPolicy casts parameters
        loss = loss_fn(self.model, batch) if loss_fn else token_loss_sum(self.model, batch, self.loss_kind).sum
        (loss * token_scale(num_tokens, self.world_size)).backward()
        return loss.detach()

    def forward_context(self) -> ContextManager[None]:
        return forward_only(self.model)

    def describe(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "kind": "fsdp", "offload_params": self.cfg.offload_params}
