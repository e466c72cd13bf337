"""Pick the strategy named by `strategy.kind`; each engine lives in its own file."""
from __future__ import annotations

from torch import nn

from train.config import Config
from train.dist import DistInfo
from train.strategies.base import Strategy


def build_strategy(model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                   load_universal: bool = False) -> Strategy:
    kind = cfg.strategy.kind
    if kind == "ddp":
        from train.strategies.ddp import DDPStrategy

        return DDPStrategy(model, cfg, info, accum)
    if kind == "fsdp":
        from train.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(model, cfg, info, accum)
    if kind == "deepspeed":
        from train.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, cfg, info, accum, load_universal=load_universal)
    raise ValueError(f"strategy.kind={kind!r}: use ddp, fsdp or deepspeed")


__all__ = ["Strategy", "build_strategy"]
