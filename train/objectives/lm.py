"""`objective=lm` (the default): next-token cross-entropy, the mean over trained tokens."""
from __future__ import annotations

import torch
from torch import nn

from train.loss import IGNORE, LossKind, token_loss_sum


class LMObjective:
    kind = "lm"

    def __init__(self, loss_kind: LossKind) -> None:
        self.loss_kind = loss_kind

    def weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def begin_step(self) -> None:
        pass

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_loss_sum(model, batch, self.loss_kind).sum

    def metrics(self, device: torch.device) -> dict[str, float]:
        return {}
