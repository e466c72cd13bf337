"""The DPO formulas on per-sequence log-probabilities, as TRL's `DPOTrainer` defines them.

The log-probability of a completion is the *sum* of its tokens' log-probs (labels != -100 of the
pre-shifted labels, see data_pipeline/read/batches.py). With the policy/reference log-ratios
r_c = logp_c - ref_c and r_r = logp_r - ref_r of a pair:

- sigmoid (DPO paper, eq. 7): -log sigmoid(beta (r_c - r_r)); with label smoothing e (cDPO):
  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d);
- ipo (TRL's `ipo`): (r_c / n_c - r_r / n_r - 1 / (2 beta))^2, where n is the completion's token
  count: TRL normalises by length, agreed with the IPO authors (see its dpo_trainer.py).

Pure tensor functions, no model: the unit tests check them against a computation of their own.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position (fp32), 0 where the label is -100. logits [R, T, V], labels [R, T]."""
    flat = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="none")
    return flat.view(labels.shape)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of each row's completion token log-probs: [R]."""
    return token_logps(logits, labels).sum(dim=1)


class PairLosses(NamedTuple):
    losses: torch.Tensor          # [B] per-pair loss (differentiable)
    chosen_rewards: torch.Tensor  # [B] beta * (logp_c - ref_c), detached
    rejected_rewards: torch.Tensor


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, *, beta: float, loss: str, label_smoothing: float = 0.0,
                chosen_tokens: torch.Tensor | None = None,
                rejected_tokens: torch.Tensor | None = None) -> PairLosses:
    """Per-pair DPO losses from per-sequence log-probs [B] (see the module docstring)."""
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        out = -F.logsigmoid(beta * delta) * (1 - label_smoothing)
        if label_smoothing:
            out = out - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        ipo_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        out = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"objective.loss={loss!r}: use sigmoid or ipo")
    return PairLosses(out, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
