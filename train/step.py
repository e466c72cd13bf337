"""One optimizer step's forward and backward, weighted by trained tokens over the global batch,
and the step's two small collectives.

The loss of a step is the mean over every trained token (label != -100) of the global batch,
across micro-batches, accumulation and ranks: the fix transformers made with
`num_items_in_batch`. Averaging per-micro-batch means instead would give a conversation with
few trained tokens the weight of one with many, depending on how the batch was split. So the
step's micro-batches are taken up front, their trained tokens counted and summed over ranks
once, and every strategy scales its micro-batch token-loss sum by that global count.

Syncs per step (tests/unit/test_loop_syncs.py counts them): the step's counts are summed over
ranks in one all-reduce that stays on the device (the strategies scale by a device tensor, no
host read); after backward the loss sum and the stop flag go in a second all-reduce; the loop
then reads everything back to the host in ONE transfer (`read_back`), which the NaN guard needs
every step anyway. The counts must be global before backward, so they cannot share the second
all-reduce.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from train import dist as d
from train.objectives.lm import TokenMeanLoss
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


def reduce_counts(local: dict[str, torch.Tensor]) -> torch.Tensor:
    """Collective 1: the step's counts summed over ranks, int64 [len(local)], left on the device."""
    return d.sum_tensor(torch.stack([v.to(torch.int64) for v in local.values()]))


def reduce_loss_and_stop(loss_sum: torch.Tensor, stop: bool) -> torch.Tensor:
    """Collective 2: [global loss sum, number of ranks that want to stop], float64 on the device.
    A NaN or inf on any rank makes the sum non-finite on every rank."""
    packed = torch.zeros(2, dtype=torch.float64, device=loss_sum.device)
    packed[0] = loss_sum
    if stop:
        packed[1] = 1.0
    return d.sum_tensor(packed)


def read_back(counts: torch.Tensor, loss_and_stop: torch.Tensor) -> list[float]:
    """The step's one host read: the global counts, then loss sum and stop flag."""
    return torch.cat([counts.to(torch.float64), loss_and_stop]).tolist()


def forward_backward(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]],
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """Accumulate the step's gradients the way the loop does; returns this rank's token-loss sum
    (detached) and the global trained-token count (read to the host: for tools and tests)."""
    objective = TokenMeanLoss()
    counts = reduce_counts(objective.counts(micro_batches))
    loss_sum = objective.forward_backward(strategy, micro_batches, counts[0])
    return loss_sum, int(counts[0].item())


def global_loss(local_sum: torch.Tensor, num_tokens: int, device: torch.device) -> float:
    """The step's loss: every rank's token-loss sum over the global trained-token count (collective)."""
    return d.sum_across_ranks([local_sum.item()], device)[0] / max(1, num_tokens)
