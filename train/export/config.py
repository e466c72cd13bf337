"""Typed settings of the export group (`conf/export/*.yaml`)."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

GGUFType = Literal["f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1",
                   "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m"]
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
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """fp32, bf16 (the default: what vLLM and transformers serve) or fp16."""
    verify: bool = True
    """Reload with transformers and compare logits before the export becomes visible."""
    keep_last: int = 2
    """Exports kept under RUN_DIR/exports (older step_N directories are deleted; 0 = keep all)."""
    max_shard_size: str = "2GB"
    """Largest safetensors file: 2GB counts 10^9 bytes, 2GiB 2^30 (a larger tensor gets its own file)."""
    gguf: list[str] | str | None = None
    """GGUF files to write next to the Hugging Face export (Llama architectures only), one
    model-TYPE.gguf per entry: f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1, or the K-quant mixes q6_k,
    q5_k_m, q4_k_m, q4_k_s, q3_k_m. A single name (`export.gguf=q8_0`) is a list of one."""
    quality: Optional[bool] = None
    """Measure the perplexity every exported format loses against the trained fp32 model
    (quality.json); null = on when the run has a validation split or export.quality_text is set."""
    quality_tokens: int = 65536
    """Tokens the perplexity is measured on (at most)."""
    quality_text: Optional[str] = None
    """A UTF-8 text file to measure perplexity on instead of the run's validation split."""
    quality_seq_len: Optional[int] = None
    """Sequence length of the perplexity windows; null = the run's trainer.seq_len (or 512)."""
    quality_max_delta: Optional[float] = None
    """Largest perplexity increase over the fp32 reference, in percent, a format may show; a format
    losing more fails the export (export.on_error decides raise or skip), nothing is published."""
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
        problems.extend(self._quality_problems())
        return problems

    @property
    def gguf_types(self) -> list[str]:
        """export.gguf as a list (a scalar is a list of one), duplicates dropped, order kept."""
        if self.gguf is None:
            return []
        items = [self.gguf] if isinstance(self.gguf, str) else list(self.gguf)
        return list(dict.fromkeys(str(i).lower() for i in items))

    def _quality_problems(self) -> list[str]:
        problems = []
        if self.gguf is not None and not isinstance(self.gguf, (str, list)):
            problems.append(f"export.gguf={self.gguf!r}: expected a type or a list of types")
            return problems
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if bad:
            problems.append(f"export.gguf: unknown type(s) {bad}: use any of {', '.join(GGUF_TYPES)} "
                            "(e.g. export.gguf=[q8_0,q4_k_m])")
        if self.quality_tokens < 1:
            problems.append(f"export.quality_tokens={self.quality_tokens}: must be >= 1")
        if self.quality_seq_len is not None and self.quality_seq_len < 2:
            problems.append(f"export.quality_seq_len={self.quality_seq_len}: must be >= 2 or null")
        if self.quality_max_delta is not None and self.quality_max_delta < 0:
            problems.append(f"export.quality_max_delta={self.quality_max_delta}: must be >= 0 (percent) or null")
        if self.quality_text is not None and not Path(self.quality_text).expanduser().is_file():
            problems.append(f"export.quality_text={self.quality_text!r}: no such file; name a UTF-8 text file "
                            "or set it to null to use the run's validation split")
        if self.quality is False and self.quality_max_delta is not None:
            problems.append("export.quality_max_delta is set but export.quality=false: nothing would be "
                            "measured; set export.quality=true or quality_max_delta=null")
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
