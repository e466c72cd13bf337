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
from typing import Any

import numpy as np
import torch

from train.export.gguf_vocab import add_vocab

_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


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


def _qtype(kind: str, shape: tuple[int, ...]) -> Any:
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _add_hparams(writer: Any, config: Any, name: str, kind: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[kind]))
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


def write_gguf(export_dir: Path, config: Any, kind: str, name: str) -> dict[str, Any]:
    """Write EXPORT/model-KIND.gguf from the export's safetensors; returns what went in."""
    import gguf
    from safetensors import safe_open

    check_supported(config)
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    for hf_name, shard in index.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"export.gguf: no llama.cpp name for tensor {hf_name!r}")
        with safe_open(str(export_dir / shard), framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append((hf_name, shard, gguf_name, shape, _qtype(kind, shape)))
    path = export_dir / f"model-{kind}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, name, kind)
    vocab_info = add_vocab(writer, export_dir, config.vocab_size)
    for _, _, gguf_name, shape, qtype in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, shard, _, _, qtype in plan:
        writer.write_tensor_data(_encode(_source(export_dir, shard, hf_name, config), qtype))
    writer.close()
    return {"file": path.name, "type": kind, "tensors": len(plan), **vocab_info}


def _source(export_dir: Path, shard: str, hf_name: str, config: Any) -> np.ndarray:
    """The tensor as GGUF stores it (fp32, q/k permuted), read from the safetensors export."""
    from safetensors import safe_open

    with safe_open(str(export_dir / shard), framework="pt") as f:
        array = f.get_tensor(hf_name).to(torch.float32).numpy()
    if hf_name.endswith("self_attn.q_proj.weight"):
        array = permute_qk(array, config.num_attention_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        array = permute_qk(array, config.num_key_value_heads or config.num_attention_heads)
    return array


def verify_gguf(export_dir: Path, config: Any, gguf_file: str) -> dict[str, Any]:
    """Read the GGUF back, dequantize every tensor and compare with its source.

    F32/F16 must equal the source rounded to that type; Q8_0 must be within its error bound:
    per 32-value block, |x - dequant(x)| <= 0.6 * max|block| / 127 (half a quantization step,
    plus the fp16 rounding of the block scale).
    """
    import gguf

    reader = gguf.GGUFReader(export_dir / gguf_file)
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    by_name = {t.name: t for t in reader.tensors}
    worst: dict[str, float] = {}
    for hf_name, shard in index.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        tensor = by_name.get(gguf_name)
        if tensor is None:
            raise GGUFExportError(f"{gguf_file}: tensor {gguf_name} ({hf_name}) is missing")
        source = _source(export_dir, shard, hf_name, config)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        qname = tensor.tensor_type.name
        if qname == "Q8_0":
            blocks = source.reshape(-1, 32)
            bound = 0.6 * np.abs(blocks).max(axis=1, keepdims=True) / 127 + 1e-12
            ok = bool((np.abs(got.reshape(-1, 32) - blocks) <= bound).all())
        else:
            expect = source.astype(np.float16 if qname == "F16" else np.float32).astype(np.float32)
            ok = bool(np.array_equal(got.astype(np.float32), expect))
        err = float(np.abs(got - source).max()) if source.size else 0.0
        worst[qname] = max(worst.get(qname, 0.0), err)
        if not ok:
            raise GGUFExportError(f"{gguf_file}: tensor {gguf_name} ({qname}) differs from {hf_name} "
                                  f"beyond its bound (max error {err:.3g})")
    arch = reader.fields["general.architecture"]
    return {"tensors_checked": len(index), "max_abs_error": worst,
            "architecture": bytes(arch.parts[arch.data[0]]).decode()}
