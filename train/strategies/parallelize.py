"""Parallelism as functions applied to a plain model (torchtitan's `parallelize.py`).

Order matters and is the same for every engine: activation checkpointing first, then
compilation of each block, then the sharding or replication wrapper.
"""
from __future__ import annotations

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


def apply_fsdp(model: nn.Module, cfg: FSDPConfig, info: DistInfo, dtype: torch.dtype) -> nn.Module:
    """`fully_shard` every decoder block, then the root; fp32 gradient reduction."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    offload: OffloadPolicy = OffloadPolicy()
    if cfg.offload_params and info.device.type == "cuda":
        offload = CPUOffloadPolicy(pin_memory=True)
    elif cfg.offload_params:
        # FSDP2's CPU offload moves shards to host memory between uses of the accelerator;
        # training on the CPU they are in host memory already, so the policy would be a no-op.
        log.warning("strategy.offload_params on CPU: parameters already live in host memory; "
                    "running FSDP2 without an offload policy")
    if not isinstance(offload, CPUOffloadPolicy):
        model.to(info.device)
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
                  offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
