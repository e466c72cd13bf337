"""PyTorch FSDP2: `fully_shard` on every decoder block, then on the root (torchtitan's recipe)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from train.config import Config
from train.dist import DistInfo
from train.model import decoder_layers, lm_loss
from train.schedule import build_scheduler
from train.strategies.base import (adamw, clip_and_step, compute_dtype,
                                   enable_activation_checkpointing)
from train.strategies.dcp_state import load_dcp, save_dcp


log = logging.getLogger("scaletrain")


class FSDPStrategy:
    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int) -> None:
        assert dist.is_initialized(), "FSDP needs a process group (init_distributed creates one)"
        self.accum, self.clip = accum, cfg.trainer.grad_clip
        self.loss_kind = cfg.trainer.loss
        s = cfg.strategy
        dtype = compute_dtype(cfg, info.device)
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        offload: OffloadPolicy = OffloadPolicy()
        if s.offload_params and info.device.type == "cuda":
            offload = CPUOffloadPolicy(pin_memory=True)
        elif s.offload_params:
            # FSDP2's CPU offload moves shards to host memory between uses of the accelerator;
            # training on the CPU they are in host memory already, so the policy would be a no-op.
            log.warning("strategy.offload_params on CPU: parameters already live in host memory; "
                        "running FSDP2 without an offload policy")
        if cfg.trainer.activation_checkpointing:
            enable_activation_checkpointing(model)
        if not isinstance(offload, CPUOffloadPolicy):
            model.to(info.device)
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=s.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=s.reshard_after_forward, **kwargs)
        self.model = model
        self.optimizer = adamw(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.trainer.max_steps)

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool) -> torch.Tensor:
        self.model.set_requires_gradient_sync(sync_grads)
        loss = lm_loss(self.model, batch, self.loss_kind)
        (loss / self.accum).backward()
        return loss.detach()

    def step(self) -> float:
        return clip_and_step(self.model, self.optimizer, self.scheduler, self.clip)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: Path) -> None:
        save_dcp(path, self.model, self.optimizer, self.scheduler)

    def load(self, path: Path, universal: bool = False) -> None:
        load_dcp(path, self.model, self.optimizer, self.scheduler)
