"""Where DPO's reference log-probs come from (`objective.reference`).

- `AdapterOff`: with `adapter=lora` the reference is the frozen base itself: the same (sharded)
  module, called with peft's `disable_adapter()`, so no second copy of the model exists.
- `FrozenCopy`: full fine-tuning keeps a copy of the starting weights, frozen, sharded the way the
  policy is (a replica for DDP and ZeRO-1/2, `fully_shard` for FSDP2, a ZeRO-3 inference engine
  for ZeRO-3), so it costs a rank what the policy's weights cost it, and no optimizer state.
- `Precomputed` (precompute.py): a table read by the pairs' index, no model at all.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from train.loss import unwrap
from train.model import weight_source
from train.model_weights import is_meta, materialize_full
from train.objectives.dpo import model_logps


class AdapterOff:
    """The policy with its LoRA adapter disabled (peft), under no_grad."""

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        peft_model = unwrap(model)
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("objective.reference=auto without an adapter has no reference: "
                             "use adapter=lora, or objective.reference=model|precompute")
        # The unwrapped module: no DDP reducer bookkeeping for a forward without gradients;
        # FSDP2 and ZeRO-3 gather their shards in hooks on the module itself.
        with torch.no_grad(), peft_model.disable_adapter():
            return model_logps(peft_model, batch)


class FrozenCopy:
    """A frozen copy of the plain model, sharded like the policy (see `frozen_copy`)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model_logps(self.module, batch)


def frozen_copy(model: nn.Module, cfg, info) -> nn.Module:
    """Copy `model` (plain, before the adapter and the strategy touch it), freeze it and shard it
    as `cfg.strategy` shards the policy."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    if is_meta(ref):  # the policy is built on the meta device: the copy reads the same weights
        # (whole, one tensor at a time; a sharded reference that loads only its shards is future work)
        materialize_full(ref, weight_source(cfg.model, ref, cfg.trainer.seed), torch.device("cpu"))
    s = cfg.strategy
    if s.kind == "fsdp":
        from train.strategies.base import compute_dtype
        from train.strategies.parallelize import apply_fsdp

        return apply_fsdp(ref, s, info, compute_dtype(cfg, info.device))
    if s.kind == "deepspeed" and s.zero_stage == 3:
        import deepspeed

        ds = {"train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
              "zero_optimization": {"stage": 3},
              "bf16": {"enabled": info.device.type == "cuda" and cfg.trainer.dtype != "fp32"}}
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        return engine.module
    return ref.to(info.device)
