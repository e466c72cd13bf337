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
    from train.model_weights import Weights
    from train.startup import Phases
    from train.strategies.base import Strategy

_CLASSES = {"ddp": "train.strategies.ddp:DDPStrategy", "fsdp": "train.strategies.fsdp:FSDPStrategy",
            "deepspeed": "train.strategies.deepspeed:DeepSpeedStrategy"}


def strategy_class(kind: str) -> type[Strategy]:
    """The class for `strategy.kind` (the schema has already checked the kind)."""
    module, name = _CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_strategy(model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                   weights: Weights | None = None, phases: Phases | None = None) -> Strategy:
    """The strategy around `model`. A meta-built model (train.model.build_meta_model) is
    materialized by the strategy from `weights`, each rank only what it keeps, timed as the
    `load` phase of `phases`."""
    return strategy_class(cfg.strategy.kind)(model, cfg, info, accum, weights=weights, phases=phases)


__all__ = ["build_strategy", "strategy_class"]
