"""A checkpoint that trained an adapter, and what `export.adapter` makes of it.

Contract with the trainer (provisional until the LoRA trainer writes it; docs/DESIGN.md "Fine-tuning"):
trainer_state.json has `"adapter": {"kind": "lora", "base_model": DIR, "lora_config": {...}}`, where
DIR is the Hugging Face base model (safetensors) and lora_config holds peft LoraConfig fields; the
checkpoint's weights (any strategy's reader) hold the adapter parameters under peft's names
(wrapper prefixes such as DDP's `module.` allowed) and nothing of the frozen base.

export.adapter: `merged` = the full model (base + LoRA delta) as every export writes it;
`adapter` = only the PEFT directory EXPORT/adapter/ (plus tokenizer); `both` (the default, null).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.checkpoint_layout import STATE_FILE
from train.export.checkpoint_reader import Checkpoint
from train.export.weights import CheckpointError

MODES = ("merged", "adapter", "both")
_ADAPTER_KEYS = (".lora_A.", ".lora_B.", ".modules_to_save.", "lora_embedding_", "lora_magnitude_vector")


@dataclass
class Adapter:
    """The trained adapter of a checkpoint."""

    kind: str
    base_dir: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def read_adapter(ckpt: Checkpoint) -> Adapter | None:
    """The adapter trainer_state.json describes (None for a full-model checkpoint)."""
    info = ckpt.state.get("adapter")
    if not info:
        return None
    state_file = ckpt.path / STATE_FILE
    if not isinstance(info, dict) or not isinstance(info.get("lora_config"), dict) or not info.get("base_model"):
        raise CheckpointError(f"{state_file}: 'adapter' must be a mapping with base_model and lora_config; "
                              "the file is corrupt or from another version")
    kind = str(info.get("kind", "lora"))
    if kind not in ("lora", "qlora"):
        raise CheckpointError(f"{state_file}: adapter kind {kind!r} cannot be exported (lora or qlora)")
    base = Path(info["base_model"]).expanduser()
    if not base.is_dir():
        raise CheckpointError(f"{state_file} names base_model={str(base)!r}, which is not a directory: the "
                              "adapter's base model must still exist to export it")
    names = [n for n in ckpt.weights.names() if any(k in n for k in _ADAPTER_KEYS)]
    if not names:
        raise CheckpointError(f"{ckpt.path}: trainer_state.json describes a {kind} adapter but the checkpoint "
                              "holds no adapter weights (lora_A/lora_B)")
    return Adapter(kind, base, dict(info["lora_config"]), {n: ckpt.weights.load(n) for n in names})


def export_parts(setting: str | None, adapter: Adapter | None, checkpoint: Path) -> tuple[bool, bool]:
    """(write the merged model, write the PEFT adapter) for export.adapter=`setting`."""
    if adapter is None:
        if setting in ("adapter", "both"):
            raise CheckpointError(f"export.adapter={setting} but {checkpoint} trained no adapter "
                                  "(trainer_state.json has no 'adapter'): drop the setting")
        return True, False
    mode = setting or "both"
    return mode in ("merged", "both"), mode in ("adapter", "both")


def merged_view(ckpt: Checkpoint, adapter: Adapter, model_config: Any) -> Checkpoint:
    """The checkpoint as the export sees it: base weights with the LoRA deltas added."""
    from train.export.peft_export import LoraMergedWeights, SafetensorsWeights

    weights = LoraMergedWeights(SafetensorsWeights(adapter.base_dir), model_config, adapter.state, adapter.config)
    return dataclasses.replace(ckpt, weights=weights)
