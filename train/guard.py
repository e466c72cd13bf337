"""The NaN guard: bad steps are skipped by every rank together, and a run that keeps producing
them rolls back to the newest finite checkpoint instead of training on (or saving) NaN.

A step is bad when its loss (the mean over all ranks, so NaN or inf on any rank makes it
non-finite everywhere) or its global gradient norm is not finite (judged before the update
from the step's one host read; DeepSpeed judges its own norm inside its step), or, with
`trainer.spike_factor`, when its loss is over that many times the median of recent good
losses. A bad step applies no optimizer update and no LR-schedule step; the strategy skips it
(`Strategy.step(skip=...)`). The decision uses only values every rank holds identically (the
all-reduced loss, the global grad norm), so all ranks skip the same steps without another
collective. After `trainer.max_bad_steps` bad steps in a row the loop rolls back; at most
`trainer.max_rollbacks` times, then `DivergedError` names the steps.

OLMo-core skips such steps, llm-foundry stops on a spike, torchtitan fails fast; PaLM rolled
back ~100 steps and skipped the data batches around the spike, which is what rollback does
here: the loader is not rewound, so the data since the checkpoint is skipped.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from train import dist as d
from train.config import TrainerConfig

log = logging.getLogger("scaletrain")
SPIKE_WINDOW = 64  # recent good losses whose median a spike is measured against
SPIKE_MIN_HISTORY = 8  # no spike verdict before this many good steps (the loss falls fast early on)


class DivergedError(RuntimeError):
    """The run kept producing bad steps after every allowed rollback; the message names them."""


@dataclass
class StepGuard:
    cfg: TrainerConfig
    verbose: bool = True
    """Whether this rank logs (rank 0; every rank reaches the same verdicts)."""
    recent: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    streak: list[str] = field(default_factory=list)
    """The current run of consecutive bad steps, as 'step N (reason)'."""
    history: list[str] = field(default_factory=list)
    """Every streak that caused a rollback."""
    skipped: int = 0
    rollbacks: int = 0

    def verdict(self, loss: float, grad_norm: float | None = None) -> str | None:
        """Why a step with this global loss (and global grad norm, where the engine gave it before
        its update) must be skipped before its update, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        f = self.cfg.spike_factor
        if f is not None and len(self.recent) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.recent)
            if loss > f * median:
                return f"loss {loss:.4g} is over {f} x the running median {median:.4g}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        return None

    def record(self, step: int, loss: float, grad_norm: float | None, reason: str | None) -> bool:
        """Count step `step`; True when its update was applied. `grad_norm` None: not known on
        the host (the engine judged it itself, and said so through `reason`)."""
        if reason is None and grad_norm is not None and not math.isfinite(grad_norm):
            reason = f"gradient norm is {grad_norm}"
        if reason is None:
            self.recent.append(loss)
            self.streak.clear()
            return True
        self.skipped += 1
        self.streak.append(f"step {step} ({reason})")
        if self.verbose:
            log.warning("skipped step %d on every rank: %s; no optimizer update (%d in a row, rollback after %d)",
                        step, reason, len(self.streak), self.cfg.max_bad_steps)
        return False

    def rollback_due(self) -> bool:
        return len(self.streak) >= self.cfg.max_bad_steps

    def start_rollback(self) -> str:
        """Account for one rollback and return the streak that caused it; raise when none is left."""
        bad = ", ".join(self.streak)
        if self.rollbacks >= self.cfg.max_rollbacks:
            earlier = "".join(f"\n  rollback {i + 1} after: {h}" for i, h in enumerate(self.history))
            raise DivergedError(
                f"training diverged: {len(self.streak)} bad steps in a row ({bad}) after "
                f"{self.rollbacks} rollback(s) (trainer.max_rollbacks={self.cfg.max_rollbacks}){earlier}\n"
                "lower optim.lr, raise schedule.warmup_steps, or inspect the data of those steps")
        self.rollbacks += 1
        self.history.append(bad)
        self.streak.clear()
        return bad

    def metrics(self) -> dict[str, float]:
        return {"skipped_steps": float(self.skipped), "bad_steps": float(len(self.streak)),
                "rollbacks": float(self.rollbacks)}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> str | None:
    """Collective: the name of a non-finite local tensor on some rank, or None when every
    rank's tensors are all finite. One pass without host syncs, then one all-reduce."""
    tensors = [(n, _local(t)) for n, t in named if torch.is_tensor(t) and t.is_floating_point()]
    flags: dict[torch.device, torch.Tensor] = {}  # one flag per device (offload keeps state on CPU)
    for _, t in tensors:
        if t.numel():
            flags[t.device] = flags.get(t.device, False) | ~torch.isfinite(t).all()
    bad = any(bool(f) for f in flags.values())
    name = next((n for n, t in tensors if t.numel() and not bool(torch.isfinite(t).all())), None) if bad else None
    if not d.any_rank(name is not None, device):
        return None
    names = [n for n in d.all_gather_object(name) if n is not None]
    return names[0]


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> Iterator[tuple[str, torch.Tensor]]:
    """An optimizer's parameters (master weights, where it holds them) and its state tensors."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            yield f"{prefix}.group{gi}.param{pi}", p
            for key, value in optimizer.state.get(p, {}).items():
                yield f"{prefix}.group{gi}.param{pi}.{key}", value
