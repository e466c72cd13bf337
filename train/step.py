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
from typing import Any, Iterator, Protocol

import torch

from train import dist as d
from train.strategies.base import Strategy

IGNORE = -100


def next_micro_batches(batches: Iterator[dict[str, Any]], accum: int,
                       device: torch.device) -> tuple[list[dict[str, torch.Tensor]], float]:
    """The step's `accum` micro-batches on `device`, and the seconds spent waiting for data."""
    out, wait = [], 0.0
    for _ in range(accum):
        t0 = time.perf_counter()
        out.append({k: v.to(device, non_blocking=True) for k, v in next(batches).items()})
        wait += time.perf_counter() - t0
    return out, wait


class Objective(Protocol):
    """What a step optimizes: the loop calls `counts`, sums them over ranks, then `forward_backward`
    with the global value of `counts()[normaliser]`. A new objective (DPO over paired batches, say)
    is a class with these three members, set as `Run.objective`."""
    normaliser: str
    """The key of `counts` the loss is a mean over (here trained tokens; pairs for DPO)."""

    def counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's 0-dim integer counts for the step, on the device (no host sync). Always
        `tokens` (real input tokens) and `trained_tokens`; an objective or data source may add
        more (per-source token counts): every key is summed over ranks and reaches StepResult."""

    def forward_backward(self, strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]],
                         normaliser: torch.Tensor) -> torch.Tensor:
        """Accumulate the step's gradients of loss_sum / normaliser; returns this rank's loss sum
        (detached, 0-dim, on the device)."""


class TokenMeanLoss:
    """Causal-LM loss, the mean over every trained token of the global batch."""
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
