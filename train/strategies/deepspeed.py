"""DeepSpeed ZeRO stages 1-3, with optional CPU offload of optimizer state and parameters.

DeepSpeed owns gradient accumulation, clipping, the optimizer and the LR scheduler step;
we only generate its config from ours. `engine.step()` must be called after every
micro-batch so that its accumulation counters stay right; it updates weights only at the
accumulation boundary.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from train.checkpoint import UNIVERSAL
from train.config import Config
from train.dist import DistInfo
from train.model import lm_loss
from train.schedule import build_scheduler
from train.strategies.base import compute_dtype, enable_activation_checkpointing, param_groups

TAG = "state"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: Config, info: DistInfo, accum: int, load_universal: bool = False) -> dict[str, Any]:
    t, s, o = cfg.trainer, cfg.strategy, cfg.optim
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * info.world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # torch's AdamW on every stage, so results match DDP/FSDP; DeepSpeedCPUAdam would need
        # compiled ops and would differ numerically.
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": compute_dtype(cfg, info.device) == torch.bfloat16},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(config, s.deepspeed)


class DeepSpeedStrategy:
    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                 load_universal: bool = False) -> None:
        if cfg.trainer.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.accum, self.loss_kind = accum, cfg.trainer.loss
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim),
            config=ds_config(cfg, info, accum, load_universal),
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.schedule, cfg.trainer.max_steps))
        self.model = self.engine
        self._micro = 0

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool) -> torch.Tensor:
        loss = lm_loss(self.engine, batch, self.loss_kind)
        self.engine.backward(loss)
        if not sync_grads:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss.detach()

    def step(self) -> float:
        assert self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=TAG)

    def load(self, path: Path, universal: bool = False) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path / (UNIVERSAL if universal else "deepspeed")), tag=TAG,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path / 'deepspeed'}")
