"""Typed settings of the export group (`conf/export/*.yaml`)."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

GGUFType = Literal["f16", "q8_0"]
GGUF_TYPES = get_args(GGUFType)


def parse_size(value: str | int) -> int:
    """Bytes in '2GB' (10^9, as Hugging Face counts), '500MiB' (2^20) or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size: write e.g. 2GB, 500MB, 64MiB or a byte count")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").upper()])


@dataclass
class ExportConfig:
    """Serving exports written into RUN_DIR/exports/step_N."""

    kind: Literal["hf", "none"] = "none"
    """`hf` or `none`."""
    every_steps: int = 0
    """Export every N steps (0 = only at the end of training)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, bf16 or fp16."""
    verify: bool = True
    """Reload with transformers and compare logits before the export becomes visible."""
    keep_last: int = 2
    """Exports kept under RUN_DIR/exports (older step_N directories are deleted; 0 = keep all)."""
    max_shard_size: str = "2GB"
    """Largest safetensors file: 2GB counts 10^9 bytes, 2GiB 2^30 (a larger tensor gets its own file)."""
    gguf: GGUFType | None = None
    """Also write GGUF: f16 or q8_0 (Llama architectures only)."""
    hooks: list[Any] = field(default_factory=list)
    """`_target_` callables called as hook(export_dir, metadata) after each export."""
    verify_tolerance: float | None = None
    """Allowed max |logit difference| relative to max |reference logit|; null = by dtype
    (fp32 1e-4, fp16 1e-2, bf16 5e-2)."""
    verify_new_tokens: int = 8
    """Tokens generated greedily by the reloaded export during verification."""
    on_error: Literal["raise", "skip"] = "skip"
    """A failed export or user hook during training: `skip` (log it, keep training) or `raise`."""
    adapter: Optional[Literal["merged", "adapter", "both"]] = None
    """For a checkpoint that trained an adapter: `merged` (the full model, HF + GGUF), `adapter` (the
    PEFT directory EXPORT/adapter/ only) or `both`; null = both. Set on a full-model checkpoint,
    `adapter`/`both` is an error."""

    def validate(self) -> list[str]:
        problems = []
        if self.every_steps < 0:
            problems.append(f"export.every_steps={self.every_steps}: must be >= 0")
        if self.keep_last < 0:
            problems.append(f"export.keep_last={self.keep_last}: must be >= 0 (0 keeps all)")
        try:
            if parse_size(self.max_shard_size) < 1:
                problems.append(f"export.max_shard_size={self.max_shard_size!r}: must be positive")
        except ValueError as exc:
            problems.append(f"export.max_shard_size: {exc}")
        if self.verify_tolerance is not None and self.verify_tolerance <= 0:
            problems.append(f"export.verify_tolerance={self.verify_tolerance}: must be > 0 or null")
        if self.verify_new_tokens < 0:
            problems.append(f"export.verify_new_tokens={self.verify_new_tokens}: must be >= 0")
        problems.extend(hook_problems(self.hooks))
        return problems


def hook_target(spec: Any) -> str | None:
    """The dotted `_target_` of one export.hooks entry (a mapping or a plain string)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("_target_"), str):
        return spec["_target_"]
    return None


def hook_problems(hooks: list[Any]) -> list[str]:
    """Import every hook target now, so a typo fails at start-up with the real ImportError."""
    problems = []
    for i, spec in enumerate(hooks):
        target = hook_target(spec)
        if target is None:
            problems.append(f"export.hooks[{i}]={spec!r}: expected a mapping with _target_: "
                            "package.module.function (or a dotted string)")
            continue
        module_name, _, attr = target.rpartition(".")
        if not module_name:
            problems.append(f"export.hooks[{i}]._target_={target!r}: use a dotted path "
                            "package.module.function")
            continue
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except ImportError as exc:
            problems.append(f"export.hooks[{i}]._target_={target!r}: cannot import module "
                            f"{module_name!r}: {type(exc).__name__}: {exc}")
            continue
        except AttributeError:
            problems.append(f"export.hooks[{i}]._target_={target!r}: module {module_name!r} "
                            f"has no attribute {attr!r}")
            continue
        if not callable(obj):
            problems.append(f"export.hooks[{i}]._target_={target!r} is not callable")
    return problems
