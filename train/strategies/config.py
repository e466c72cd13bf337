"""Typed settings of each engine (conf/strategy/*.yaml), chosen by `kind`.

Torch-free, so that `python -m launch` validates a config without importing an engine.
Each class carries only what its engine understands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DDPConfig:
    """PyTorch DistributedDataParallel: a full replica per rank (train/strategies/ddp.py)."""

    name: str = "ddp"
    """Display name (the conf/strategy file), used in run names and logs."""
    kind: Literal["ddp"] = "ddp"

    def validate(self) -> list[str]:
        return []

    def compile_problem(self) -> str | None:
        return None


@dataclass
class FSDPConfig:
    """PyTorch FSDP2, `fully_shard` per decoder block then the root (train/strategies/fsdp.py)."""

    name: str = "fsdp"
    kind: Literal["fsdp"] = "fsdp"
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3 like); false = ZeRO-2 like."""
    offload_params: bool = False
    """CPUOffloadPolicy: parameters, gradients and the optimizer step in host memory (GPU only)."""

    def validate(self) -> list[str]:
        return []

    def compile_problem(self) -> str | None:
        return None


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO stages 1-3 with optional CPU offload (train/strategies/deepspeed.py)."""

    name: str = "zero1"
    kind: Literal["deepspeed"] = "deepspeed"
    zero_stage: Literal[1, 2, 3] = 1
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Optimizer state (and its step) in host memory."""
    offload_params: bool = False
    """ZeRO-3 only: parameters in host memory."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged over the generated one (e.g. bucket sizes)."""

    def validate(self) -> list[str]:
        if self.offload_params and self.zero_stage != 3:
            return [f"strategy.offload_params=true needs strategy.zero_stage=3 (got {self.zero_stage}): "
                    "use strategy=zero3_offload"]
        return []

    def compile_problem(self) -> str | None:
        """ZeRO-3 gathers parameters in module hooks inside each block, which torch.compile
        cannot trace (DeepSpeed fails in its hooks with a compiled block)."""
        if self.zero_stage == 3:
            return (f"trainer.compile=true with strategy={self.name} (ZeRO-3): DeepSpeed gathers "
                    "parameters in hooks that torch.compile cannot trace; use strategy=fsdp (FSDP2 "
                    "shards parameters too and compiles), zero1 or zero2, or trainer.compile=false")
        return None


StrategyConfig = DDPConfig | FSDPConfig | DeepSpeedConfig
