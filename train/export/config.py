"""Typed settings of the export group (`conf/export/*.yaml`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExportConfig:
    """Serving exports written into RUN_DIR/exports/step_N."""

    kind: str = "none"
    """`hf` or `none`."""
    every_steps: int = 0
    """Export every N steps (0 = only at the end of training)."""
    dtype: str = "fp32"
    """fp32, bf16 or fp16."""
    verify: bool = True
    """Reload with transformers and compare logits before the export becomes visible."""
    keep_last: int = 2
    max_shard_size: str = "2GB"
    gguf: str | None = None
    """Also write GGUF: f16 or q8_0 (Llama architectures only)."""
    hooks: list[Any] = field(default_factory=list)
    """`_target_` callables called as hook(export_dir, metadata) after each export."""

    def validate(self) -> list[str]:
        problems = []
        if self.kind not in ("hf", "none"):
            problems.append(f"export.kind={self.kind!r}: use export=hf or export=none")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            problems.append(f"export.dtype={self.dtype!r}: use fp32, bf16 or fp16")
        if self.gguf not in (None, "f16", "q8_0"):
            problems.append(f"export.gguf={self.gguf!r}: use f16, q8_0 or null")
        if self.every_steps < 0:
            problems.append(f"export.every_steps={self.every_steps}: must be >= 0")
        return problems
