"""`objective=dpo`: Direct Preference Optimization through the ordinary loop and strategies.

A preference micro-batch (data_pipeline/read/pairs.py) holds B pairs as 2B rows: rows [0, B)
the chosen sequences, rows [B, 2B) the rejected ones, in the same order, so a pair never
straddles micro-batches or ranks. The step's loss is the mean over every pair of the global
batch: each micro-batch returns the *sum* of its pair losses and the strategies scale it by
world size / global pair count, exactly as the token loss is weighted (train/step.py).

The reference log-probs come from a `Reference` (reference.py): the policy with its adapter
disabled, a frozen copy, or the table precomputed before training (precompute.py).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from train import dist as d
from train.objectives.config import ObjectiveConfig
from train.objectives.dpo_math import IGNORE, pair_losses, sequence_logps
from train.objectives.lm import TokenMeanLoss

# TRL's metric names (DPOTrainer), logged in metrics.jsonl, W&B and the report.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


class Reference(Protocol):
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs [2B] of the batch's rows (no grad); `model` is the policy as the
        strategy wraps it."""


def model_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs [rows] of `model` (called through its own wrapper, so
    sharded parameters are gathered and gradient hooks fire)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    return sequence_logps(logits, batch["labels"])


def num_pairs(batch: dict[str, torch.Tensor]) -> int:
    rows = batch["input_ids"].size(0)
    if rows % 2:
        raise ValueError(f"a preference micro-batch has {rows} rows: expected chosen and rejected "
                         "rows in equal numbers (shards from `prepare mode=preference`)")
    return rows // 2


class DPOObjective:
    """loss_sum(model, batch) -> sum of the batch's pair losses; weight(batch) -> its pair count.
    Metrics of the step's pairs are summed as they pass and reduced over ranks by `metrics`."""

    kind = "dpo"
    normaliser = "pairs"

    def __init__(self, cfg: ObjectiveConfig, reference: Reference) -> None:
        self.cfg, self.reference = cfg, reference
        self._sums: torch.Tensor | None = None

    def weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(num_pairs(batch), device=batch["input_ids"].device)

    def begin_step(self) -> None:
        self._sums = None

    def counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pairs, completion tokens and real tokens of the step, on the device (the loop's protocol)."""
        counts = TokenMeanLoss(padded=True).counts(micro_batches)
        counts["pairs"] = torch.stack([self.weight(b) for b in micro_batches]).sum()
        return counts

    def forward_backward(self, strategy, micro_batches: list[dict[str, torch.Tensor]],
                         normaliser: torch.Tensor) -> torch.Tensor:
        """The strategy scales each micro-batch's sum of pair losses by the global pair count."""
        self.begin_step()
        last = len(micro_batches) - 1
        sums = [strategy.forward_backward(b, sync_grads=i == last, num_tokens=normaliser, loss_fn=self.loss_sum)
                for i, b in enumerate(micro_batches)]
        return torch.stack(sums).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = num_pairs(batch)
        ref = self.reference.logps(model, batch).detach().float()
        logps = model_logps(model, batch)
        tokens = (batch["labels"] != IGNORE).sum(dim=1)
        out = pair_losses(logps[:b], logps[b:], ref[:b], ref[b:], beta=self.cfg.beta, loss=self.cfg.loss,
                          label_smoothing=self.cfg.label_smoothing, chosen_tokens=tokens[:b],
                          rejected_tokens=tokens[b:])
        c, r = out.chosen_rewards, out.rejected_rewards
        lp = logps.detach()
        sums = torch.stack([c.sum(), r.sum(), (c - r).sum(), (c > r).float().sum(), lp[:b].sum(),
                            lp[b:].sum(), torch.tensor(float(b), device=c.device)])
        self._sums = sums if self._sums is None else self._sums + sums
        return out.losses.sum()

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Means over every pair of the step on every rank (collective: call it on all ranks)."""
        local = self._sums.tolist() if self._sums is not None else [0.0] * (len(METRICS) + 1)
        total = d.sum_across_ranks(local, device)
        n = max(total[-1], 1.0)
        return {k: v / n for k, v in zip(METRICS, total[:-1])}

    def evaluate(self, forward_context, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
        """eval_loss and the reward metrics (eval_ prefixed, as the loop's eval keys are) over
        held-out preference micro-batches."""
        saved, self._sums = self._sums, None
        loss = 0.0
        with forward_context():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss += float(self.loss_sum(model, batch))
        m = self.metrics(device)
        pairs = self._sums[-1].item() if self._sums is not None else 0.0
        total_loss, total_pairs = d.sum_across_ranks([loss, pairs], device)
        self._sums = saved
        return {"eval_loss": total_loss / max(total_pairs, 1.0), **{f"eval_{k}": v for k, v in m.items()}}
