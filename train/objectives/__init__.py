"""What a training step minimises (`objective=lm|dpo`), behind one small protocol.

The loop (train/loop.py `train_step`) asks an objective for its step's counts (`counts`, summed
over ranks in the step's first all-reduce, on the device), then to run forward and backward over
the step's micro-batches as a mean over the global value of `counts()[normaliser]` (trained
tokens, or preference pairs); on logging steps `metrics(device)` (collective). Everything else in
the loop is the same for every objective.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch is not imported here: train.config (and so `python -m launch`) imports this package
    import torch


class Objective(Protocol):
    kind: str
    """`lm` or `dpo`."""
    normaliser: str
    """The key of `counts` the loss is a mean over (trained tokens; pairs for DPO)."""

    def counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's 0-dim integer counts for the step, on the device (no host sync). Always
        `tokens` (real input tokens) and `trained_tokens`; an objective or data source may add
        more: every key is summed over ranks and reaches the loop's StepResult."""

    def forward_backward(self, strategy, micro_batches: list[dict[str, torch.Tensor]],
                         normaliser: torch.Tensor) -> torch.Tensor:
        """Accumulate the step's gradients of loss_sum / normaliser; returns this rank's loss sum
        (detached, 0-dim, on the device)."""

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Metrics of the step for the log (collective: every rank calls it); {} for none."""


__all__ = ["Objective"]
