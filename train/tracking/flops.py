"""Model FLOPs per token, device peak FLOP/s and MFU (model FLOPs utilisation).

Counting follows torchtitan (`get_nparams_and_flops`) and llm-foundry: a training token costs
6 FLOPs per parameter that multiplies it (2 forward + 4 backward) plus the attention score and
value products, 12 * n_layers * n_heads * head_dim * seq_len (full, not causal-halved).

N is *all parameters minus the input embedding table* (a lookup, no FLOPs), as torchtitan
counts it. The output projection (lm_head) is a real matmul, so it is always counted, also
when it is tied to the input embedding. Activation recomputation is not counted (that
would be HFU, not MFU).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger("scaletrain.tracking")

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s, from the vendors' datasheets.
# Keys are matched against torch.cuda.get_device_name (case-insensitive), first match wins, so
# the more specific names come first. The same chip sold as SXM, PCIe and NVL runs at different
# clocks and power limits and gets its own figure. torch reports an SXM H100 as "NVIDIA H100 80GB
# HBM3" and an SXM H200 as "NVIDIA H200"; the PCIe and NVL boards carry their form factor in the
# name. Consumer GeForce cards are listed at their bf16-with-fp32-accumulate rate, which is what
# PyTorch's bf16 matmuls use.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),     # NVIDIA GB200 NVL72 datasheet, per GPU (5 PFLOPS sparse / 2)
    ("B200", 2.25e15),     # NVIDIA HGX B200 datasheet, per GPU (4.5 PFLOPS sparse / 2)
    # Hopper. Source: NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100, "BF16 Tensor Core",
    # sparse figures halved): SXM 1979 -> 989.5, NVL 1671 -> 835.5 (per GPU), PCIe 1513 -> 756.5.
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),      # SXM5 ("H100 80GB HBM3", "H100 SXM5 ..."), also GH200's H100
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 1979 -> 989.5, NVL 1671 -> 835.5.
    ("H200 NVL", 835e12),
    ("H200", 989e12),      # SXM ("NVIDIA H200"), also GH200
    ("H800 PCIe", 756e12),  # China variant of the H100 PCIe board: its tensor-core rate is the H100 PCIe one
    ("H800", 989e12),
    ("H20", 148e12),       # NVIDIA H20 spec sheet: 296 TFLOPS sparse -> 148
    ("A100", 312e12),      # NVIDIA A100 datasheet: 312 dense, SXM and PCIe alike
    ("A800", 312e12),
    ("A30", 165e12),
    ("A10G", 125e12),   # AWS's A10 variant; NVIDIA publishes only the A10 figure
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI325X", 1307e12),
    ("MI250X", 191.5e12),  # per GCD, which is what one torch device is
]


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def flops_per_token(hf_config: Mapping[str, Any] | Any, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer described by an HF config.

    Works from the config alone (no model needed) for Llama/Mistral/Qwen-style configs
    (gated MLP with `intermediate_size`) and GPT-2-style ones (`n_embd`, `n_layer`, 4h MLP).
    """
    h = _get(hf_config, "hidden_size", "n_embd", "d_model")
    layers = _get(hf_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(hf_config, "num_attention_heads", "n_head", "num_heads")
    vocab = _get(hf_config, "vocab_size")
    missing = [n for n, v in (("hidden_size", h), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: cannot count FLOPs from the config")
    head_dim = _get(hf_config, "head_dim", default=h // heads)
    kv_heads = _get(hf_config, "num_key_value_heads", default=heads)
    gated = _get(hf_config, "intermediate_size") is not None
    inter = _get(hf_config, "intermediate_size", "n_inner", default=4 * h)
    attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    mlp = (3 if gated else 2) * h * inter
    norms = 2 * h
    n = layers * (attn + mlp + norms) + h + vocab * h  # final norm + lm_head; no input embedding
    return 6.0 * n + 12.0 * layers * heads * head_dim * seq_len


def flops_per_token_from_model(model: torch.nn.Module, hf_config: Any, seq_len: int) -> float:
    """Same count from the live parameters (for architectures the config formula misses).

    Uses the model's own parameter count; call before sharding (FSDP/ZeRO-3 hide the shapes).
    """
    params = {id(p): p for p in model.parameters()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_embed = sum(p.numel() for p in embed.parameters()) if embed is not None else 0
    n = sum(p.numel() for p in params.values()) - n_embed
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and embed is not None and out.weight is embed.weight:
        n += out.weight.numel()  # tied: the lm_head matmul still runs
    layers = _get(hf_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(hf_config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _get(hf_config, "head_dim", default=_get(hf_config, "hidden_size", "n_embd") // heads)
    return 6.0 * n + 12.0 * layers * heads * head_dim * seq_len


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float | None:
    """The config formula, else the live parameter count; call on the plain model, before
    sharding. None (MFU left out, with a warning) when neither can count."""
    try:
        return flops_per_token(model.config, seq_len)
    except ValueError as e:
        try:
            return flops_per_token_from_model(model, model.config, seq_len)
        except (TypeError, ValueError, AttributeError):
            log.warning("%s, nor from the model's parameters: MFU is not reported", e)
            return None


def device_peak_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name as torch.cuda.get_device_name reports it."""
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return value
    return None


_warned: set[str] = set()


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` (tracking.peak_flops) if set, else the table.

    None on CPU and on unknown GPUs (MFU is then left out, with one warning naming the fix).
    """
    if override:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    peak = device_peak_flops(name)
    if peak is None and name not in _warned:
        _warned.add(name)
        log.warning("no peak FLOP/s known for %r: MFU is not reported; set tracking.peak_flops "
                    "(dense bf16 FLOP/s, e.g. 989e12) to get it", name)
    return peak


def mfu(tokens_per_s_per_device: float, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the peak or the FLOPs count is unknown)."""
    if not peak or not flops_per_token or tokens_per_s_per_device is None:
        return None
    return tokens_per_s_per_device * flops_per_token / peak
