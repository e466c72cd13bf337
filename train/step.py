"""One optimizer step's forward and backward, weighted by trained tokens over the global batch.

The loss of a step is the mean over every trained token (label != -100) of the global batch,
across micro-batches, accumulation and ranks: the fix transformers made with
`num_items_in_batch`. Averaging per-micro-batch means instead would give a conversation with
few trained tokens the weight of one with many, depending on how the batch was split. So the
step's micro-batches are taken up front, their trained tokens counted and summed over ranks
once, and every strategy scales its micro-batch token-loss sum by that global count.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from train import dist as d
from train.objectives import Objective
from train.strategies.base import Strategy


def next_micro_batches(batches: Iterator[dict[str, Any]], accum: int,
                       device: torch.device) -> tuple[list[dict[str, torch.Tensor]], float]:
    """The step's `accum` micro-batches on `device`, and the seconds spent waiting for data."""
    out, wait = [], 0.0
    for _ in range(accum):
        t0 = time.perf_counter()
        out.append({k: v.to(device, non_blocking=True) for k, v in next(batches).items()})
        wait += time.perf_counter() - t0
    return out, wait


def forward_backward(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]],
                     device: torch.device, objective: Objective | None = None) -> tuple[torch.Tensor, int]:
    """Accumulate the step's gradients; returns this rank's token-loss sum (detached) and the
    global trained-token count (one all-reduce). With an `objective`, its loss sum and its
    weight (DPO: pairs) replace the token loss and the token count."""
    weight = objective.weight if objective is not None else (lambda b: (b["labels"] != -100).sum())
    if objective is not None:
        objective.begin_step()
    local = torch.stack([weight(b) for b in micro_batches]).sum().item()
    num_tokens = int(round(d.sum_across_ranks([float(local)], device)[0]))
    last = len(micro_batches) - 1
    extra = {"loss_fn": objective.loss_sum} if objective is not None else {}
    sums = [strategy.forward_backward(b, sync_grads=i == last, num_tokens=num_tokens, **extra)
            for i, b in enumerate(micro_batches)]
    return torch.stack(sums).sum(), num_tokens


def global_loss(local_sum: torch.Tensor, num_tokens: int, device: torch.device) -> float:
    """The step's loss: every rank's token-loss sum over the global trained-token count (collective)."""
    return d.sum_across_ranks([local_sum.item()], device)[0] / max(1, num_tokens)
