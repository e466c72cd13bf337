"""One optimizer step's forward and backward, weighted by trained tokens over the global batch,
the step's two small collectives and its one host read.

The loss of a step is the mean over every trained token (label != -100) of the global batch,
across micro-batches, accumulation and ranks: the fix transformers made with
`num_items_in_batch`. Averaging per-micro-batch means instead would give a conversation with
few trained tokens the weight of one with many, depending on how the batch was split. So the
step's micro-batches are taken up front, their trained tokens counted and summed over ranks
once, and every strategy scales its micro-batch token-loss sum by that global count.

Syncs per step (tests/unit/test_loop_syncs.py counts them on a gloo group):

1. all-reduce 1, the step's counts, left on the device: the strategies scale by the device
   count, so nothing waits for it. It must be global before backward, so it cannot share 2.
2. all-reduce 2, [loss sum, ranks asking to stop, ranks whose data source is lost]: the data-loss
   agreement rides here (train/data_loss.py: a rank that lost its source runs the step on its
   previous batch so that every collective still matches, and no rank applies the update).
3. ONE host read (`read_back`): the global counts, those three values and the strategy's grad
   norm (`Strategy.clip_grads`, a device tensor computed before the update) in one transfer.
   DeepSpeed computes and checks its norm inside its own step (it reads it to the host itself
   for its overflow check; we add nothing): its norm stays on the device until a logging step.

Why one host read on every step, not only on logging steps (torchtitan reads nothing on the
others): the NaN guard skips a bad step, and skipping is a host decision made before the update:
`optimizer.step()` and the LR schedule's `step()` are not called, the guard's streak and
rollback are counted. That needs the global loss and grad norm on the host before the optimizer
runs, on every step. torchtitan can defer its `.item()` because it never skips: it clips and
steps whatever the norm, and a NaN shows at the next log, after the weights took it. GradScaler
makes the same trade as we do: `GradScaler.step` reads `found_inf` with `.item()` every step
before it calls `optimizer.step()`, unless the optimizer is a fused one that takes `found_inf`
as a device tensor and skips on the device. That escape does not fit here: it needs fused
AdamW (another kernel than the foreach AdamW that DDP, FSDP2 and DeepSpeed's `torch_adam`
share, so the strategies would no longer match step for step), the LR schedule would still
step on the host, and the spike test (a running median of good losses) and the rollback are
host logic. Given that one read, the stop flag, the lost-source flag and the counts (read for
`trainer.max_tokens` and the token totals) ride in it for free: deferring them would save no
sync. On a GPU the two all-reduces are queued on the device without the host waiting; the
host waits once per step, after backward and the clip, before the optimizer.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, NamedTuple

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


def reduce_loss_and_flags(loss_sum: torch.Tensor, stop: bool, lost: bool) -> torch.Tensor:
    """Collective 2: [global loss sum, ranks that want to stop, ranks whose data source is lost],
    float64 on the device. A NaN or inf on any rank makes the sum non-finite on every rank."""
    packed = torch.zeros(3, dtype=torch.float64, device=loss_sum.device)
    packed[0] = loss_sum
    if stop:
        packed[1] = 1.0
    if lost:
        packed[2] = 1.0
    return d.sum_tensor(packed)


class HostValues(NamedTuple):
    """The step's one host read."""
    counts: list[int]
    loss_sum: float
    stoppers: int
    losers: int
    """Ranks whose data source is lost this step."""
    grad_norm: float | None
    """None where the engine computes its norm inside its step (DeepSpeed)."""


def read_back(counts: torch.Tensor, packed: torch.Tensor, grad_norm: torch.Tensor | None) -> HostValues:
    """The step's one host read: the global counts, [loss sum, stoppers, losers] and the grad norm."""
    parts = [counts.to(torch.float64), packed]
    if grad_norm is not None:  # on the CPU under FSDP2 parameter offload
        parts.append(grad_norm.detach().reshape(1).to(device=packed.device, dtype=torch.float64))
    values = torch.cat(parts).tolist()
    n = len(counts)
    return HostValues([int(v) for v in values[:n]], values[n], int(values[n + 1]), int(values[n + 2]),
                      values[n + 3] if grad_norm is not None else None)


def optimizer_step(strategy: Strategy, skip: bool = False) -> float:
    """Clip, then step unless `skip` or the grad norm is not finite; the global grad norm, read to
    the host. The loop's sequence, for tools and tests (the loop folds this read into `read_back`)."""
    norm = strategy.clip_grads()
    if norm is not None:
        norm = float(norm)
        skip = skip or not math.isfinite(norm)
    update = strategy.step(skip=skip)
    return norm if norm is not None else float(update.grad_norm)


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
