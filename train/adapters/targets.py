"""Check `adapter.target_modules` and `adapter.modules_to_save` against the model they adapt.

peft silently drops a target name that matches no module as long as another one matches (and
raises a traceback when none does), so `[q_proj, nonexistent_proj]` would train q_proj only.
This check runs on the plain model before peft sees it, and needs only module names and types:
it works on a model built on the meta device as well as on a loaded one.
"""
from __future__ import annotations

from torch import nn

from data_pipeline.schema import ConfigError
from train.adapters.config import AdapterConfig


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of names: the full module name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules usually lists)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style projections are linear layers too

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, (nn.Linear, Conv1D))})


def target_problems(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """One problem per setting with entries that match no module of `model` ([] when all match)."""
    if cfg.kind == "none":
        return []
    names = [name for name, _ in model.named_modules() if name]
    problems = []
    for key, wanted in (("adapter.target_modules", cfg.target_modules),
                        ("adapter.modules_to_save", cfg.modules_to_save or [])):
        unmatched = [t for t in wanted if not any(_matches(n, t) for n in names)]
        if unmatched:
            problems.append(f"{key}: {unmatched} match no module of {type(model).__name__}; its linear "
                            f"modules are {linear_names(model)}: list only those (e.g. "
                            f"{key}=[{','.join(linear_names(model)[:2])}])")
    return problems


def check_targets(model: nn.Module, cfg: AdapterConfig) -> None:
    """Raise ConfigError naming every adapter entry that matches no module of `model`."""
    problems = target_problems(model, cfg)
    if problems:
        raise ConfigError(problems)
