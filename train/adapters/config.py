"""Typed settings of the adapter group (`conf/adapter/*.yaml`)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

# Every linear projection of a Llama-style block: attention and MLP.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    """LoRA / QLoRA through peft on a frozen base model; `none` trains every parameter."""

    kind: Literal["none", "lora", "qlora"] = "none"
    """`none` (full fine-tuning), `lora`, or `qlora` (LoRA on a 4-bit NF4 base, CUDA only)."""
    r: int = 16
    """Rank of the low-rank update B @ A."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (0 keeps training deterministic across layouts)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    """Module names (peft matches name suffixes) that get a LoRA update."""
    modules_to_save: list[str] | None = None
    """Modules trained in full next to the adapter (e.g. [lm_head]); null = none."""

    def validate(self) -> list[str]:
        if self.kind == "none":
            return []
        rules = [
            (self.r < 1, f"adapter.r={self.r}: must be >= 1"),
            (self.alpha <= 0, f"adapter.alpha={self.alpha}: must be > 0"),
            (not 0.0 <= self.dropout < 1.0, f"adapter.dropout={self.dropout}: must be in [0, 1)"),
            (not self.target_modules, "adapter.target_modules is empty: name the modules to adapt, "
                                      f"e.g. {ALL_LINEAR}"),
        ]
        return [msg for bad, msg in rules if bad]

    def lora_config(self) -> dict[str, Any]:
        """peft LoraConfig fields: what trainer_state.json records and the export rebuilds."""
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules),
                "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
                "task_type": "CAUSAL_LM"}


def adapter_problems(cfg: AdapterConfig, model_kind: str, strategy_kind: str, device: str,
                     export_kind: str) -> list[str]:
    """Cross-field rules of an adapter run, checked before any process group starts."""
    if cfg.kind == "none":
        return []
    problems = []
    if export_kind != "none" and model_kind != "hf_local":
        problems.append(f"adapter={cfg.kind} with export={export_kind} needs model=hf_local: the export "
                        "merges the adapter into the base read from model.path (save a built model with "
                        "save_pretrained and train it as model=hf_local model.path=DIR)")
    if cfg.kind == "qlora":
        problems.extend(_qlora_problems(model_kind, strategy_kind, device))
    return problems


def _qlora_problems(model_kind: str, strategy_kind: str, device: str) -> list[str]:
    problems = []
    if model_kind != "hf_local":
        problems.append("adapter=qlora quantizes a pretrained base: set model=hf_local model.path=DIR")
    if strategy_kind not in ("ddp", "fsdp"):
        problems.append(f"adapter=qlora runs under strategy=ddp or strategy=fsdp, not {strategy_kind} "
                        "(4-bit bitsandbytes weights cannot be partitioned by DeepSpeed)")
    if device == "cpu" or not _cuda_available():
        problems.append("adapter=qlora needs a CUDA GPU (bitsandbytes NF4 kernels) and none is visible: "
                        "use adapter=lora on this machine")
    elif importlib.util.find_spec("bitsandbytes") is None:
        problems.append("adapter=qlora needs the bitsandbytes package: pip install bitsandbytes")
    return problems


def _cuda_available() -> bool:
    import torch  # only for qlora: the schema stays torch-free otherwise

    return torch.cuda.is_available()
