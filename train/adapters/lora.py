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
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.fsutil import file_sha256
from train.adapters.config import AdapterConfig
from train.config import ModelConfig
from train.model_weights import is_meta, set_param_dtypes

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def apply_adapter(model: nn.Module, cfg: AdapterConfig, base_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The peft model with `cfg`'s LoRA on `model` (frozen); `model` itself when kind=none.
    On a meta-built model the adapter is created on meta too (peft's low_cpu_mem_usage), and the
    frozen base is set to `base_dtype` (model.base_dtype) while the adapter keeps fp32 masters: the
    strategy then allocates each in that dtype."""
    if cfg.kind == "none":
        return model
    from peft import LoraConfig, get_peft_model

    if cfg.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # fp32 norms and a grad-enabled input, no gradient checkpointing (trainer.activation_checkpointing decides)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    meta = is_meta(model)
    model = get_peft_model(model, LoraConfig(**cfg.lora_config()), low_cpu_mem_usage=meta)
    if meta:
        set_param_dtypes(model, base_dtype)
    return model


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


def base_fingerprint(cfg: ModelConfig, model_config: dict[str, Any], seed: int) -> str:
    """The base's identity without reading its weights (a requeue of a 70B run must not re-read
    140 GB): for hf_local, sha256 over each weight file's name, size and safetensors header (names,
    dtypes, shapes and byte offsets of every tensor) and a few small windows of its bytes (two
    fine-tunes of one architecture share every header, not their weights); for a model built from
    config, over the config and the seed that initializes it (train/model_weights.py).
    `base_content_digest` hashes all the bytes, under checkpoint.verify=true."""
    h = hashlib.sha256()
    if cfg.kind == "hf_local" and cfg.path:
        files = _weight_files(cfg)
        for f in files:
            h.update(f"{f.name}:{f.stat().st_size}:".encode())
            h.update(_safetensors_header(f))
            h.update(_sampled_bytes(f))
            h.update(b"\n")
        if files:
            return "files:" + h.hexdigest()
    h.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    return f"init:{seed}:" + h.hexdigest()


def base_content_digest(cfg: ModelConfig) -> str | None:
    """sha256 over the bytes of every weight file (hf_local only): the full check, read once per start."""
    if cfg.kind != "hf_local" or not cfg.path:
        return None
    h = hashlib.sha256()
    for f in _weight_files(cfg):
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return "sha256:" + h.hexdigest()


def _weight_files(cfg: ModelConfig) -> list[Path]:
    return sorted(f for pattern in WEIGHT_PATTERNS for f in Path(str(cfg.path)).glob(pattern))


def _sampled_bytes(f: Path, windows: int = 8) -> bytes:
    """`windows` evenly spaced windows of the file, together at most 1/32 of it and 32 KiB."""
    size = f.stat().st_size
    width = max(1, min(4096, size // (32 * windows)))
    out = []
    with open(f, "rb") as fh:
        for k in range(windows):
            fh.seek(size * (2 * k + 1) // (2 * windows))
            out.append(fh.read(width))
    return b"".join(out)


def _safetensors_header(f: Path) -> bytes:
    """The JSON header of a safetensors file (8-byte length, then the header): kilobytes, not the
    weights. Other formats contribute their modification time instead."""
    if f.suffix != ".safetensors":
        return str(f.stat().st_mtime_ns).encode()
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(min(n, 100 * 2**20))


def adapter_info(cfg: AdapterConfig, model_cfg: ModelConfig, fingerprint: str,
                 content_digest: str | None = None) -> dict[str, Any] | None:
    """What trainer_state.json records under `adapter` (None for full fine-tuning); the export
    reads the base from `base_model` and rebuilds peft's LoraConfig from `lora_config`.
    `base_content_sha256` only when checkpoint.verify=true computed it."""
    if cfg.kind == "none":
        return None
    base = str(Path(model_cfg.path).absolute()) if model_cfg.kind == "hf_local" and model_cfg.path else None
    info = {"kind": cfg.kind, "base_model": base, "base_fingerprint": fingerprint,
            "lora_config": cfg.lora_config()}
    if content_digest is not None:
        info["base_content_sha256"] = content_digest
    return info


def check_resume_base(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume an adapter on another base (or an adapter run from a full one, or back)."""
    if saved is None and current is None:
        return
    if saved is None or current is None:
        was = f"adapter={saved['kind']}" if saved else "adapter=none (full fine-tuning)"
        now = f"adapter={current['kind']}" if current else "adapter=none"
        raise ValueError(f"cannot resume {checkpoint}: it was trained with {was}, this run has {now}; "
                         "use the same adapter setting or a new run.dir")
    both = saved.get("base_content_sha256") and current.get("base_content_sha256")
    if saved.get("base_fingerprint") != current["base_fingerprint"] or (
            both and saved["base_content_sha256"] != current["base_content_sha256"]):
        raise ValueError(
            f"cannot resume {checkpoint}: its adapter was trained on the base model "
            f"{saved.get('base_model')} (fingerprint {saved.get('base_fingerprint')}), but this run's base is "
            f"{current['base_model']} (fingerprint {current['base_fingerprint']}); set model.path to the "
            "original base or start a new run.dir")
