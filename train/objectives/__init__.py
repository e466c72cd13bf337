"""What a training step minimises (`objective=lm|dpo`), behind one small protocol.

The loop and step.py ask an objective three things: `weight(batch)` (what the step's loss is a
mean over: trained tokens, or preference pairs), `loss_sum(model, batch)` (the micro-batch's
differentiable sum, which the strategy scales by world size / global weight and backpropagates)
and, on logging steps, `metrics(device)` (collective). Everything else in the loop is the same.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Objective(Protocol):
    kind: str

    def weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def begin_step(self) -> None: ...

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def metrics(self, device: torch.device) -> dict[str, float]: ...


__all__ = ["Objective"]
