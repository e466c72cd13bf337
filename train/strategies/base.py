"""The small protocol every strategy follows, and what DDP and FSDP2 share.

A strategy owns everything that differs between engines: applying parallelism to the plain
model, backward, step (clip + optimizer + LR schedule), saving and loading (resharding when
the world size changed), and the precision of forward-only work. The loop never asks which
strategy it has.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from train.checkpoint_layout import MODEL_DIR
from train.config import Config, OptimConfig
from train.guard import optimizer_tensors
from train.schedule import apply_optim_settings, build_scheduler


class Update(NamedTuple):
    """What `Strategy.step` did."""
    applied: bool
    """The optimizer and the LR schedule stepped (False: `skip`, or the engine's own overflow check)."""
    grad_norm: torch.Tensor | float | None = None
    """The global grad norm where the engine computes it inside its step (DeepSpeed), left on the
    device; None when `clip_grads` returned it."""


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""A micro-batch's differentiable loss *sum* (train/objectives): token losses, or DPO pair losses."""


class Strategy(Protocol):
    needs_process_group: ClassVar[bool]
    """Whether the engine needs torch.distributed even on one process (FSDP2, DeepSpeed)."""
    model: nn.Module
    """The wrapped model; call it on every rank (ZeRO-3 and FSDP gather inside forward)."""
    compute_dtype: torch.dtype
    """Precision of forward and backward (bf16 on GPU, fp32 on CPU unless trainer.dtype says)."""

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool, num_tokens: int,
                         loss_fn: LossFn | None = None) -> torch.Tensor:
        """Sum of the token losses of one micro-batch (detached), gradients accumulated; reduce
        only if sync_grads. `num_tokens` is the step's trained-token count over every
        micro-batch and rank: the accumulated gradients are those of sum / num_tokens.
        `loss_fn(model, batch)` replaces the token-loss sum (an objective's, e.g. DPO's pair
        losses; `num_tokens` is then its global weight, e.g. the pair count)."""

    def clip_grads(self) -> torch.Tensor | None:
        """Clip the step's accumulated gradients (trainer.grad_clip) and return their global norm
        before clipping: a 0-d device tensor, the same on every rank, NOT read to the host (the
        loop reads it in the step's one host read, train/step.py, before it decides the update).
        None where the engine clips inside its own `step` (DeepSpeed)."""

    def step(self, skip: bool = False) -> Update:
        """After `clip_grads`: optimizer step, LR schedule step, zero grads. With `skip` the grads
        are dropped and neither the optimizer nor the schedule steps (the NaN guard, train/guard.py,
        decided from the loss and the norm). Reads nothing to the host itself."""

    def lr(self) -> float: ...

    def forward_context(self) -> ContextManager[None]:
        """Forward-only work (evaluation, export reference logits): eval mode, no grad, and the
        same precision as training."""

    def describe(self) -> dict[str, Any]:
        """What trainer_state.json records about the engine (name, kind, engine details)."""

    def save(self, path: Path) -> None:
        """Collective: write this strategy's native state under `path` (a fresh directory)."""

    def load(self, path: Path, saved_world_size: int) -> None:
        """Collective: restore what `save` wrote, resharding when `saved_world_size` differs.
        Optimizer and schedule settings come from the current config, not the checkpoint."""

    def state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's weights and optimizer state (local shards): what a checkpoint saves,
        checked for NaN/inf before it is written."""

    # Optional: `save_async(path) -> list[Future]` stages the state and writes it in the
    # background (checkpoint.async=true); engines without it save blocking.


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only (not on norms or biases), as in nanoGPT and torchtitan."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partitioned parameter keeps its real shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def token_scale(num_tokens: int | torch.Tensor, world_size: int) -> float | torch.Tensor:
    """Factor on a micro-batch's summed token loss so that, after the engine averages gradients
    over ranks (DDP, FSDP2, ZeRO all do), the step's gradient is that of the global token mean
    (transformers' num_items_in_batch fix): a token weighs the same however the batch is split."""
    if isinstance(num_tokens, torch.Tensor):  # the loop's device count: no host sync
        return world_size / num_tokens.clamp(min=1)
    return world_size / max(1, num_tokens)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.trainer.dtype == "bf16" or (cfg.trainer.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """bf16 autocast on GPU when asked; plain fp32 elsewhere."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def forward_only(model: nn.Module, precision: ContextManager | None = None) -> Iterator[None]:
    """Eval mode and no grad inside `precision`; back to train mode afterwards."""
    model.eval()
    try:
        with torch.no_grad(), precision or contextlib.nullcontext():
            yield
    finally:
        model.train()


class TorchOptim:
    """AdamW + LR schedule + clipping + DCP state for engines that use torch's own optimizer
    (DDP and FSDP2, whose grad norms are DTensors reduced over the mesh by torch). Its step,
    lr, save and load are those strategies' own.

    DCP writes one file per rank plus metadata and reshards on load, so a checkpoint written by
    N ranks resumes on M. Model and optimizer live in separate DCP directories so that an
    export can read the model tensors alone.
    """

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        o = cfg.optim
        self.model, self.clip, self.cfg = model, cfg.trainer.grad_clip, cfg
        self.params = list(model.parameters())
        """Walking the module tree for them costs ~40 us a step; the clip skips those without a grad."""
        self.optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.trainer.max_steps)
        self._ckpt_groups: list[dist.ProcessGroup] = []

    def clip_grads(self) -> torch.Tensor:
        """torch's clip is free of host syncs: the norm and the clip factor stay on the device (a
        non-finite norm makes the grads non-finite; the loop then skips the step)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        # FSDP2: a DTensor norm, made whole by one all-reduce over the mesh (DDP: grads already all-reduced)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, skip: bool = False) -> Update:
        if not skip:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Update(applied=not skip)

    def state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.named_parameters()
        yield from optimizer_tensors(self.optimizer)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _model_options(self) -> StateDictOptions:
        """Only trainable parameters are checkpointed: a frozen base (adapter runs) is read from
        its own files again, so load must not expect it."""
        frozen = any(not p.requires_grad for p in self.model.parameters())
        return StateDictOptions(ignore_frozen_params=True, strict=not frozen)

    def save(self, path: Path) -> None:
        dcp.save(get_model_state_dict(self.model, options=self._model_options()), checkpoint_id=str(path / MODEL_DIR))
        dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=str(path / "optim"))
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")

    def save_async(self, path: Path) -> list[Future]:
        """Stage model and optimizer state in host memory (training waits only for this), then
        write it in background threads (torch.distributed.checkpoint.async_save). Each of the two
        writes (model/, optim/) runs in a thread of its own and coordinates over a gloo group of
        its own, so that their collectives never interleave with each other or with training's
        (one shared group deadlocks: the two threads' collectives meet in different orders)."""
        if not self._ckpt_groups and dist.is_initialized():
            self._ckpt_groups = [dist.new_group(backend="gloo") for _ in range(2)]
        groups = self._ckpt_groups or [None, None]
        futures = [dcp.async_save(get_model_state_dict(self.model, options=self._model_options()),
                                  checkpoint_id=str(path / MODEL_DIR), process_group=groups[0]),
                   dcp.async_save(get_optimizer_state_dict(self.model, self.optimizer),
                                  checkpoint_id=str(path / "optim"), process_group=groups[1])]
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
        return futures

    def load(self, path: Path, saved_world_size: int) -> None:
        """DCP reshards by itself: the saved world size does not matter here."""
        options = self._model_options()
        model_sd = get_model_state_dict(self.model, options=options)
        dcp.load(model_sd, checkpoint_id=str(path / MODEL_DIR))
        set_model_state_dict(self.model, model_sd, options=options)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(optim_sd, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        apply_optim_settings(self.optimizer, self.scheduler, self.cfg)
