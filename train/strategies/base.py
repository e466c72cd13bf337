"""The small protocol every strategy follows, and what they share.

A strategy owns what differs between engines: wrapping model and optimizer, backward,
step (clip + optimizer + LR schedule), and saving/loading its native sharded state.
The loop never asks which strategy it has.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from train.config import Config, OptimConfig


class Strategy(Protocol):
    model: nn.Module
    """The wrapped model; call it on every rank (ZeRO-3 and FSDP gather inside forward)."""

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool) -> torch.Tensor:
        """Loss of one micro-batch (detached), gradients accumulated; reduce only if sync_grads."""

    def step(self) -> float:
        """Clip, optimizer step, LR schedule step, zero grads; returns the global grad norm."""

    def lr(self) -> float: ...

    def save(self, path: Path) -> None:
        """Collective: write this strategy's native state under `path` (a fresh directory)."""

    def load(self, path: Path, universal: bool = False) -> None:
        """Collective: restore what `save` wrote, resharding where the engine can
        (`universal`: DeepSpeed's world-size-independent copy made by the loop)."""


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only (not on norms or biases), as in nanoGPT and torchtitan."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on GPU when asked; plain fp32 elsewhere."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.trainer.dtype == "bf16" or (cfg.trainer.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, clip: float) -> float:
    """Clip the global grad norm, step optimizer and schedule, zero grads; returns the norm.

    Shared by DDP and FSDP2 (whose norms are DTensors, reduced over the mesh by torch)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant, works under every engine)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
