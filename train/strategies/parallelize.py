"""Parallelism as functions applied to a plain model (torchtitan's `parallelize.py`).

Order matters and is the same for every engine: activation checkpointing first, then
compilation of each block, then the sharding or replication wrapper.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from train.config import TrainerConfig
from train.dist import DistInfo
from train.model import decoder_layers, decoder_stack
from train.model_weights import Weights, buffer_owners, fill_shards, init_buffers, is_meta
from train.strategies.config import FSDPConfig

log = logging.getLogger("scaletrain")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant, works under every engine)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_block_transforms(model: nn.Module, cfg: TrainerConfig) -> None:
    """What every engine applies to the plain model before wrapping it, in this order."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each decoder block (torchtitan's way): the blocks repeat, so one graph
    serves all, and the embedding and loss stay eager. After activation checkpointing (which
    the compiled block then contains) and before sharding (whose hooks stay outside the graph).
    DCP state dicts drop the `_orig_mod.` that the wrapper adds to parameter names."""
    blocks = decoder_stack(model)
    for name, block in blocks.named_children():
        blocks.register_module(name, torch.compile(block))


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Replicate across ranks; one process trains the plain model."""
    model.to(info.device)
    if info.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def apply_frozen_upcast(model: nn.Module, dtype: torch.dtype) -> int:
    """Frozen parameters kept in a lower precision than a fp32 compute (a bf16 base under LoRA on
    CPU, where autocast does not help): each module computes with an fp32 copy of them made for
    its forward and dropped after it, as FSDP2's MixedPrecisionPolicy does for its all-gathers.
    Registered after the engine's own hooks (ZeRO-3 gathers first, releases after).
    Returns the number of modules hooked."""
    if dtype != torch.float32:
        return 0  # autocast (DDP) or the engine (DeepSpeed bf16) computes in the base's precision
    hooked = 0
    for module in model.modules():
        low = [k for k, p in module._parameters.items()
               if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype]
        if low:
            module.register_forward_pre_hook(_upcast(low, dtype))
            module.register_forward_hook(_restore, prepend=True)
            hooked += 1
    return hooked


def _upcast(names: list[str], dtype: torch.dtype):
    def hook(module: nn.Module, args) -> None:
        module._scaletrain_frozen = {k: module._parameters[k] for k in names}
        for k in names:
            module._parameters[k] = module._scaletrain_frozen[k].detach().to(dtype)
    return hook


def _restore(module: nn.Module, args, output) -> None:
    module._parameters.update(module.__dict__.pop("_scaletrain_frozen", {}))


def apply_fsdp(model: nn.Module, cfg: FSDPConfig, info: DistInfo, dtype: torch.dtype,
               weights: Weights | None = None, phases=None) -> nn.Module:
    """`fully_shard` every decoder block, then the root; fp32 gradient reduction. A meta model is
    sharded on meta, then each rank allocates its shards and fills them from `weights` (torchtitan:
    meta init -> parallelize -> to_empty -> load)."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    offload: OffloadPolicy = OffloadPolicy()
    if cfg.offload_params and info.device.type == "cuda":
        offload = CPUOffloadPolicy(pin_memory=True)
    elif cfg.offload_params:
        # FSDP2's CPU offload moves shards to host memory between uses of the accelerator;
        # training on the CPU they are in host memory already, so the policy would be a no-op.
        log.warning("strategy.offload_params on CPU: parameters already live in host memory; "
                    "running FSDP2 without an offload policy")
    meta = is_meta(model)
    owners = buffer_owners(model)
    if not isinstance(offload, CPUOffloadPolicy) and not meta:
        model.to(info.device)
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
                  offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if meta:
        assert weights is not None, "a meta-built model needs a Weights source"
        with phases.phase("load") if phases is not None else contextlib.nullcontext():
            device = torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else info.device
            model.to_empty(device=device)  # only this rank's shards are allocated
            fill_shards(model, weights, info.rank, info.world_size)
            init_buffers(model, owners, info.device)
    return model
