"""`objective=lm` (the default): next-token cross-entropy, the mean over every trained token of
the global batch; and how a step counts real (non-pad) tokens."""
from __future__ import annotations

import torch

from train.loss import IGNORE
from train.strategies.base import Strategy


class TokenMeanLoss:
    """Causal-LM loss, the mean over every trained token of the global batch (the strategy's own
    loss path: plain, chunked or fused, train/loss.py)."""
    kind = "lm"
    normaliser = "trained_tokens"

    def __init__(self, padded: bool = False) -> None:
        self.padded = padded
        """Rows may end in padding (chat rows): count it out of `tokens`."""

    def counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        trained = torch.stack([(b["labels"] != IGNORE).sum() for b in micro_batches]).sum()
        real = torch.stack([_real_tokens(b, self.padded) for b in micro_batches]).sum()
        return {"trained_tokens": trained, "tokens": real}

    def forward_backward(self, strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]],
                         normaliser: torch.Tensor) -> torch.Tensor:
        last = len(micro_batches) - 1
        sums = [strategy.forward_backward(b, sync_grads=i == last, num_tokens=normaliser)
                for i, b in enumerate(micro_batches)]
        return torch.stack(sums).sum()

    def metrics(self, device: torch.device) -> dict[str, float]:
        return {}


def padding_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per batch, the number of pad positions, on the device. Padding (data_pipeline/read/rows.py)
    is the tail of a row after its last conversation: it starts a position segment of its own
    (position id 0), repeats one token id (the pad id) and has label -100. So a row's padding is
    its last position segment when that segment is all one token id and all -100; a real
    conversation never is (it has trained tokens)."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    length = ids.shape[-1]
    idx = torch.arange(length, device=ids.device)
    start = torch.where(pos == 0, idx, 0).amax(dim=-1, keepdim=True)  # where each row's last segment begins
    pad_like = (ids == ids[..., -1:]) & (labels == IGNORE)
    is_pad = (pad_like | (idx < start)).all(dim=-1)
    return torch.where(is_pad, length - start.squeeze(-1), 0).sum()


def _real_tokens(batch: dict[str, torch.Tensor], padded: bool) -> torch.Tensor:
    ids = batch["input_ids"]
    return ids.numel() - padding_tokens(batch) if padded else ids.new_full((), ids.numel())  # no host copy
