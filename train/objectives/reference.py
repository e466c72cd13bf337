"""Where DPO's reference log-probs come from (`objective.reference`).

- `AdapterOff`: under an adapter (`adapter=lora|qlora`, reference `auto` or `model`) the reference
  is the frozen base itself: the same (sharded) module, called with peft's `disable_adapter()` (TRL's
  way), so no second copy of the model exists.
- `FrozenCopy`: full fine-tuning keeps the starting weights in a frozen module of its own, built on
  the meta device like the policy and materialized only where the strategy keeps it (`frozen_copy`):
  `fully_shard`ed on meta for FSDP2 (each rank fills only its shards from the weight files),
  partitioned module by module as it is created for ZeRO-3 (a frozen engine, as TRL's
  `prepare_deepspeed` makes for reference models), one replica per rank for DDP and ZeRO-1/2. It
  is stored in the base's dtype (`reference_dtype`) and computes in the training dtype, and has no
  gradients or optimizer state.
- `Precomputed` (precompute.py): a table read by the pairs' index, no model at all.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from train import dist as d
from train.loss import unwrap
from train.model import weight_source
from train.model_weights import is_meta, materialize_full, resolve_base_dtype, set_param_dtypes
from train.objectives.dpo import model_logps
from train.strategies.base import compute_dtype
from train.strategies.parallelize import apply_frozen_upcast, apply_fsdp

log = logging.getLogger("scaletrain")


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


def reference_dtype(model_cfg) -> torch.dtype:
    """The storage dtype of the frozen reference: `model.base_dtype` (`auto`: the dtype the weight
    files store, so the reference is the starting policy's exact values). A model built from config
    starts from an fp32 initialization: under `auto` its reference stays fp32, so that step 1 has
    policy == reference exactly (loss ln 2); `model.base_dtype=bf16` rounds it."""
    if model_cfg.base_dtype == "auto" and not (model_cfg.kind == "hf_local" and model_cfg.path):
        return torch.float32
    return resolve_base_dtype(model_cfg.base_dtype, model_cfg.path if model_cfg.kind == "hf_local" else None)


def frozen_copy(model: nn.Module, cfg, info) -> nn.Module:
    """A frozen reference of `model` (the plain meta-built model, before the adapter and the
    strategy), materialized as `cfg.strategy` keeps the policy: no rank of a sharded strategy ever
    holds the whole of it (see the module docstring)."""
    assert is_meta(model), "the DPO reference is built from the meta model (adapters use AdapterOff)"
    ref = copy.deepcopy(model)  # meta: shapes and names only
    ref.requires_grad_(False)
    ref.eval()
    set_param_dtypes(ref, reference_dtype(cfg.model))  # all frozen: every parameter in the base's dtype
    weights = weight_source(cfg.model, ref, cfg.trainer.seed)  # same names, so the same weights and init
    dtype = compute_dtype(cfg, info.device)
    s = cfg.strategy
    if s.kind == "fsdp":
        # Sharded on meta, then each rank allocates and fills only its rows; FSDP2's
        # MixedPrecisionPolicy gathers them in the training dtype.
        return apply_fsdp(ref, s, info, dtype, weights)
    if s.kind == "deepspeed" and s.zero_stage == 3:
        from train.strategies.deepspeed import frozen_zero3  # deepspeed is imported only when used

        return frozen_zero3(ref, weights, cfg, info)
    materialize_full(ref, weights, info.device)  # every rank needs it whole: one copy, a tensor at a time
    if s.kind == "deepspeed" and dtype != torch.float32:
        ref.to(dtype)  # DeepSpeed computes the policy in its module dtype (bf16), without autocast
    apply_frozen_upcast(ref, dtype)  # a bf16 base computing in fp32 (DDP's autocast handles bf16)
    return ref


def resident_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of the module's parameters this rank holds, bytes of the whole parameters): FSDP2's
    local shards, ZeRO-3's partitions (as created: parameters under DeepSpeed's
    `stage3_param_persistence_threshold` stay whole on every rank after their first gather)."""
    local = whole = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            size = p.ds_tensor.element_size()
            local, whole = local + p.ds_tensor.numel() * size, whole + p.ds_numel * size
        else:
            size = p.element_size()
            held = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            local, whole = local + held * size, whole + p.numel() * size
    return local, whole


def describe(module: nn.Module, strategy_name: str) -> dict:
    """What each rank holds of the reference (collective): the startup record's `reference` entry."""
    local, whole = resident_bytes(module)
    dtypes = sorted({str(getattr(p, "ds_tensor", p).dtype).replace("torch.", "") for p in module.parameters()})
    out = {"kind": "model", "strategy": strategy_name, "dtype": ",".join(dtypes), "bytes_whole": whole,
           "rank_bytes": d.all_gather_object(local)}
    log.info("DPO reference: a frozen copy (%s, %s), %.2f MiB on each rank of %.2f MiB whole", strategy_name,
             out["dtype"], max(out["rank_bytes"]) / 2**20, whole / 2**20)
    return out
