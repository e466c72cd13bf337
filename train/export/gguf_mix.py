"""Which ggml type each tensor of a Llama GGUF gets, for every `export.gguf` type.

The K-quant names are llama.cpp's "mixes" (file types), not single types: Q4_K_M keeps some
tensors at Q6_K, and so on. The rules are those of llama.cpp's `llama-quantize` without an
importance matrix, from src/llama-quant.cpp (llama.cpp, MIT licence):

- `llama_ftype_get_default_type`: the mix's base type (q4_k_m -> Q4_K, q3_k_m -> Q3_K, ...).
- `tensor_allows_quantization`: only 2-D `*.weight` tensors; `*_norm.weight` stays as it is (F32).
- `llama_tensor_get_type_impl` for the llama architecture (no experts, not 70B):
  * output.weight (token_embd.weight when tied): Q8_0 if its rows do not divide into the base
    type's blocks, else Q6_K unless the base type is Q8_0.
  * attn_v (i-th of n): Q4_K_M/Q5_K_M -> Q6_K where use_more_bits(i, n); Q4_K_S -> Q5_K for i < 4;
    Q3_K_M -> Q5_K for i < 2, else Q4_K.
  * ffn_down (layer i of n): Q4_K_M/Q5_K_M -> Q6_K where use_more_bits(i, n); Q4_K_S -> Q5_K for
    i < n/8; Q3_K_M -> Q5_K for i < n/16, else Q4_K.
  * attn_output: Q3_K_M -> Q4_K.
- `tensor_type_fallback`: a tensor whose rows are not a multiple of the chosen type's block
  (256 for K-quants) falls back: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; if the
  rows do not divide into 32 either, F16. llama-quantize prints this as "falling back"; the
  export records every fallback in export.json.

f16 and bf16 follow convert_hf_to_gguf.py's --outtype: 2-D tensors in that type, 1-D in F32.
"""
from __future__ import annotations

import re
from typing import Any

_DEFAULT = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0",
            "q4_1": "Q4_1", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q3_k_m": "Q3_K"}
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q5_0": "MOSTLY_Q5_0",
              "q5_1": "MOSTLY_Q5_1", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q6_k": "MOSTLY_Q6_K",
              "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S",
              "q3_k_m": "MOSTLY_Q3_K_M"}
_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def _mix_rule(kind: str, name: str, base: str, ncols: int, layer: int, n_layer: int, tied: bool) -> str:
    """llama_tensor_get_type_impl for a Llama tensor, before the shape fallback."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % block_size(base):
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if ".attn_v." in name:
        if kind in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            return "Q6_K"
        if kind == "q4_k_s" and layer < 4:
            return "Q5_K"
        if kind == "q3_k_m":
            return "Q5_K" if layer < 2 else "Q4_K"
    elif ".ffn_down." in name:
        if kind in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            return "Q6_K"
        if kind == "q4_k_s" and layer < n_layer // 8:
            return "Q5_K"
        if kind == "q3_k_m":
            return "Q5_K" if layer < n_layer // 16 else "Q4_K"
    elif ".attn_output." in name and kind == "q3_k_m":
        return "Q4_K"
    return base


def _fallback(type_name: str, ncols: int) -> str:
    """tensor_type_fallback: a type whose blocks fit the rows, else F16."""
    if ncols % block_size(type_name) == 0:
        return type_name
    smaller = _FALLBACK.get(type_name, type_name)
    return smaller if ncols % block_size(smaller) == 0 else "F16"


def tensor_types(kind: str, tensors: list[tuple[str, tuple[int, ...]]], n_layer: int) -> dict[str, Any]:
    """{gguf tensor name: gguf.GGMLQuantizationType} for the mix `kind` (an export.gguf name).

    `tensors` are (gguf name, numpy shape) in file order; a row is the last axis (ggml's ne[0])."""
    return mix(kind, tensors, n_layer)[0]


def mix(kind: str, tensors: list[tuple[str, tuple[int, ...]]], n_layer: int) -> tuple[dict[str, Any], list[str]]:
    """tensor_types, and the names of the tensors that fell back to another type for their shape."""
    import gguf

    base = _DEFAULT[kind]
    tied = not any(n == "output.weight" for n, _ in tensors)
    out, fell_back = {}, []
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
            out[name] = gguf.GGMLQuantizationType.F32
            continue
        ncols = shape[-1]
        if base in ("F16", "BF16"):
            chosen = base
        else:
            match = _LAYER.match(name)
            rule = _mix_rule(kind, name, base, ncols, int(match.group(1)) if match else -1, n_layer, tied)
            chosen = _fallback(rule, ncols)
            if chosen != rule:
                fell_back.append(name)
        out[name] = gguf.GGMLQuantizationType[chosen]
    return out, fell_back


def bits_per_weight(types: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> float:
    """Bits per weight of the tensor data (what llama.cpp reports as BPW)."""
    import gguf

    total_bytes = total_values = 0
    for name, qtype in types.items():
        n = 1
        for d in shapes[name]:
            n *= d
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        total_bytes += n // block * size
        total_values += n
    return 8 * total_bytes / max(1, total_values)
