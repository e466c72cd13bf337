"""Apply a peft adapter to the plain model, and tie its checkpoints to the base they trained on.

`apply_adapter` runs on the plain model before activation checkpointing and sharding (docs/STYLE.md §2),
so every strategy sees an ordinary module whose frozen base parameters have
requires_grad=False: only the adapter reaches the optimizer, the clipping and the checkpoint.
A checkpoint records the base's path and a fingerprint of its weights (`adapter_info`);
resuming against another base is refused (`check_resume_base`), since the adapter is only
meaningful on the weights it was trained with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.fsutil import file_sha256
from train.adapters.config import AdapterConfig
from train.config import ModelConfig

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """The peft model with `cfg`'s LoRA on `model` (frozen); `model` itself when kind=none."""
    if cfg.kind == "none":
        return model
    from peft import LoraConfig, get_peft_model

    if cfg.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # fp32 norms and a grad-enabled input, no gradient checkpointing (trainer.activation_checkpointing decides)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(**cfg.lora_config()))


def quantized_base(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """A 4-bit NF4 base (bitsandbytes) on `device` for adapter=qlora; validation made sure of CUDA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=torch.bfloat16)  # bf16 storage: FSDP shards it like any bf16
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, quantization_config=quant, local_files_only=True, trust_remote_code=cfg.trust_remote_code,
        dtype=torch.bfloat16, device_map={"": device.index or 0})
    model.config.use_cache = False
    return model


def base_fingerprint(cfg: ModelConfig, model: nn.Module) -> str:
    """sha256 over the base's weight files (hf_local) or its tensor bytes (built from config)."""
    h = hashlib.sha256()
    if cfg.kind == "hf_local" and cfg.path:
        files = sorted(f for pattern in WEIGHT_PATTERNS for f in Path(cfg.path).glob(pattern))
        for f in files:
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
        if files:
            return "files:" + h.hexdigest()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "tensors:" + h.hexdigest()


def adapter_info(cfg: AdapterConfig, model_cfg: ModelConfig, fingerprint: str) -> dict[str, Any] | None:
    """What trainer_state.json records under `adapter` (None for full fine-tuning); the export
    reads the base from `base_model` and rebuilds peft's LoraConfig from `lora_config`."""
    if cfg.kind == "none":
        return None
    base = str(Path(model_cfg.path).absolute()) if model_cfg.kind == "hf_local" and model_cfg.path else None
    return {"kind": cfg.kind, "base_model": base, "base_fingerprint": fingerprint,
            "lora_config": cfg.lora_config()}


def check_resume_base(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume an adapter on another base (or an adapter run from a full one, or back)."""
    if saved is None and current is None:
        return
    if saved is None or current is None:
        was = f"adapter={saved['kind']}" if saved else "adapter=none (full fine-tuning)"
        now = f"adapter={current['kind']}" if current else "adapter=none"
        raise ValueError(f"cannot resume {checkpoint}: it was trained with {was}, this run has {now}; "
                         "use the same adapter setting or a new run.dir")
    if saved.get("base_fingerprint") != current["base_fingerprint"]:
        raise ValueError(
            f"cannot resume {checkpoint}: its adapter was trained on the base model "
            f"{saved.get('base_model')} (fingerprint {saved.get('base_fingerprint')}), but this run's base is "
            f"{current['base_model']} (fingerprint {current['base_fingerprint']}); set model.path to the "
            "original base or start a new run.dir")
