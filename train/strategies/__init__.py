"""Pick the strategy named by `strategy.kind`; each engine lives in its own file.

Torch-free at import time (the config schema imports `train.strategies.config` from here),
so engines are imported only when a strategy is built.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from train.config import Config
    from train.dist import DistInfo
    from train.strategies.base import Strategy

_CLASSES = {"ddp": "train.strategies.ddp:DDPStrategy", "fsdp": "train.strategies.fsdp:FSDPStrategy",
            "deepspeed": "train.strategies.deepspeed:DeepSpeedStrategy"}


def strategy_class(kind: str) -> type[Strategy]:
    """The class for `strategy.kind` (the schema has already checked the kind)."""
    module, name = _CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_strategy(model: nn.Module, cfg: Config, info: DistInfo, accum: int) -> Strategy:
    return strategy_class(cfg.strategy.kind)(model, cfg, info, accum)


__all__ = ["build_strategy", "strategy_class"]
