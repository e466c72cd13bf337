"""GGUF (llama.cpp / Ollama) export of a Llama-architecture Hugging Face export, and its check.

Follows llama.cpp's convert_hf_to_gguf.py for Llama: tensor names from gguf's own name map,
q/k projection rows permuted to llama.cpp's rotary layout, 1-D norms kept in F32, 2-D weights
in F16 or Q8_0 (Q8_0 needs rows of a multiple of 32 values; other 2-D tensors fall back to F16,
as convert_hf_to_gguf does). The vocabulary goes in as a gpt2-style BPE with the pre-tokenizer
llama.cpp must use (gguf_vocab.py). Without a tokenizer (synthetic data) the file is still written, with
tokenizer.ggml.model=no_vocab: llama.cpp loads it for token-id inference, Ollama cannot chat
with it, and export.json says so. Tensors are streamed one at a time from the safetensors
export, never all in memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from train.export.gguf_mix import FILE_TYPES, bits_per_weight, mix
from train.export.gguf_vocab import add_vocab

Source = Callable[[str], np.ndarray]
# Largest relative RMS error (||x - dequant(x)|| / ||x|| over a tensor) each type may show in
# verify_gguf: about twice what llama.cpp's reference quantizers give on Gaussian weights
# (measured: Q8_0 0.004, Q6_K 0.018, Q5_K 0.036, Q4_K 0.07, Q3_K 0.15; Q4_0 0.09, Q5_0 0.045).
REL_RMSE_BOUND = {"Q8_0": 0.01, "Q6_K": 0.05, "Q5_K": 0.09, "Q5_0": 0.09, "Q5_1": 0.09,
                  "Q4_K": 0.17, "Q4_0": 0.17, "Q4_1": 0.17, "Q3_K": 0.32}


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF; the message says why and what to do."""


def check_supported(config: Any) -> None:
    """Raise GGUFExportError unless `config` is a plain Llama that llama.cpp's `llama` arch runs."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GGUFExportError(
            f"export.gguf supports Llama-architecture models only (model_type 'llama'); this model is "
            f"{model_type!r} ({(getattr(config, 'architectures', None) or ['?'])[0]}). Set export.gguf=null, "
            "or convert the Hugging Face export with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"export.gguf: rope_type={rope.get('rope_type')!r} is not supported here "
                              "(only unscaled RoPE); use llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("export.gguf: attention/MLP biases are not supported for the llama arch")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved layout (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    from train.export.kquants import quantize

    return quantize(array, qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _add_hparams(writer: Any, config: Any, name: str, kind: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _plan(export_dir: Path, config: Any) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(hf name, shard, gguf name, shape) of every tensor of the export, in file order."""
    import gguf
    from safetensors import safe_open

    index = json.loads((export_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    for hf_name, shard in index.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"export.gguf: no llama.cpp name for tensor {hf_name!r}")
        with safe_open(str(export_dir / shard), framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append((hf_name, shard, gguf_name, shape))
    return plan


def write_gguf(export_dir: Path, config: Any, kind: str, name: str, source: Source | None = None) -> dict[str, Any]:
    """Write EXPORT/model-KIND.gguf; returns what went in (types per tensor, fallbacks, bits per weight).

    `source(hf_name)` gives a tensor in fp32 (the checkpoint's own weights, so that a quantized
    file is made from the trained values, not from the bf16 export); None = the export's safetensors."""
    import gguf

    check_supported(config)
    plan = _plan(export_dir, config)
    types, fell_back = mix(kind, [(g, shape) for _, _, g, shape in plan], config.num_hidden_layers)
    path = export_dir / f"model-{kind}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, name, kind)
    vocab_info = add_vocab(writer, export_dir, config.vocab_size)
    for _, _, gguf_name, shape in plan:
        qtype = types[gguf_name]
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, shard, gguf_name, _ in plan:
        writer.write_tensor_data(_encode(_as_stored(hf_name, _read(export_dir, shard, hf_name, source), config),
                                         types[gguf_name]))
    writer.close()
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return {"file": path.name, "type": kind, "tensors": len(plan), "tensor_types": counts,
            "fallback_tensors": fell_back, "size_bytes": path.stat().st_size,
            "bits_per_weight": round(bits_per_weight(types, {g: s for _, _, g, s in plan}), 4), **vocab_info}


def _read(export_dir: Path, shard: str, hf_name: str, source: Source | None) -> np.ndarray:
    from safetensors import safe_open

    if source is not None:
        return np.asarray(source(hf_name), dtype=np.float32)
    with safe_open(str(export_dir / shard), framework="pt") as f:
        return f.get_tensor(hf_name).to(torch.float32).numpy()


def _as_stored(hf_name: str, array: np.ndarray, config: Any) -> np.ndarray:
    """The tensor as GGUF stores it: q/k rows permuted to llama.cpp's rotary layout."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute_qk(array, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute_qk(array, config.num_key_value_heads or config.num_attention_heads)
    return array


def verify_gguf(export_dir: Path, config: Any, gguf_file: str, source: Source | None = None) -> dict[str, Any]:
    """Read the GGUF back, dequantize every tensor with the gguf package and compare with its source.

    F32/F16/BF16 must equal the source rounded to that type; Q8_0 must be within half a step per
    32-value block (0.6 * max|block| / 127, the fp16 scale's rounding included); the other quantized
    types within REL_RMSE_BOUND of the tensor's RMS, a bound that a wrong byte layout far exceeds."""
    import gguf

    reader = gguf.GGUFReader(export_dir / gguf_file)
    by_name = {t.name: t for t in reader.tensors}
    worst: dict[str, float] = {}
    plan = _plan(export_dir, config)
    for hf_name, shard, gguf_name, shape in plan:
        tensor = by_name.get(gguf_name)
        if tensor is None:
            raise GGUFExportError(f"{gguf_file}: tensor {gguf_name} ({hf_name}) is missing")
        expected = _as_stored(hf_name, _read(export_dir, shard, hf_name, source), config)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        qname = tensor.tensor_type.name
        if qname == "Q8_0":
            blocks = expected.reshape(-1, 32)
            bound = 0.6 * np.abs(blocks).max(axis=1, keepdims=True) / 127 + 1e-12
            ok = bool((np.abs(got.reshape(-1, 32) - blocks) <= bound).all())
        elif qname in REL_RMSE_BOUND:
            rms = float(np.sqrt(np.mean(expected.astype(np.float64) ** 2)))
            err = float(np.sqrt(np.mean((got.astype(np.float64) - expected) ** 2)))
            ok = err <= REL_RMSE_BOUND[qname] * rms + 1e-12
        else:
            rounded = {"F16": np.float16, "F32": np.float32}.get(qname)
            expect = (expected.astype(rounded).astype(np.float32) if rounded else
                      torch.from_numpy(expected).to(torch.bfloat16).float().numpy())
            ok = bool(np.array_equal(got.astype(np.float32), expect))
        err = float(np.abs(got - expected).max()) if expected.size else 0.0
        worst[qname] = max(worst.get(qname, 0.0), err)
        if not ok:
            raise GGUFExportError(f"{gguf_file}: tensor {gguf_name} ({qname}) differs from {hf_name} "
                                  f"beyond its bound (max error {err:.3g})")
    arch = reader.fields["general.architecture"]
    return {"tensors_checked": len(plan), "max_abs_error": worst,
            "architecture": bytes(arch.parts[arch.data[0]]).decode()}


def load_gguf_state(export_dir: Path, gguf_file: str, config: Any) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of the export's GGUF, every tensor dequantized to fp32 by the
    gguf package and q/k rows put back in Hugging Face order: the weights a served GGUF computes with."""
    import gguf

    reader = gguf.GGUFReader(export_dir / gguf_file)
    hf_names = {g: hf for hf, _, g, _ in _plan(export_dir, config)}
    state = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ggml's ne (row length first)
        array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        hf_name = hf_names.get(t.name)
        if hf_name is None:
            raise GGUFExportError(f"{gguf_file}: tensor {t.name} is not one of the export's")
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = unpermute_qk(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = unpermute_qk(array, config.num_key_value_heads or config.num_attention_heads)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(array))
    return state
