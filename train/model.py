"""Build the plain model: a Llama-style decoder from config, or a local HF checkpoint.

Parallelism is applied afterwards by a strategy (docs/STYLE.md §2); this file knows nothing of it.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from train.attention import set_attention
from train.config import ModelConfig
from train.model_weights import Weights, materialize_full


def hf_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std, attention_dropout=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_meta_model(cfg: ModelConfig, vocab_size: int | None) -> nn.Module:
    """The module tree on the meta device: shapes and names, no weight allocated (fp32 dtypes).
    A strategy materializes it from `weight_source` (train/model_weights.py)."""
    if cfg.kind == "hf_local":
        assert cfg.path is not None
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True,
                                            trust_remote_code=cfg.trust_remote_code)
        config.dtype = torch.float32  # the dtype each parameter gets is decided when it is materialized
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                     dtype=torch.float32)
    else:
        vocab = cfg.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size is null and the data gives no vocabulary size: "
                             "set model.vocab_size")
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_config(cfg, vocab))
    model.config.use_cache = False
    # Set explicitly (default sdpa: exact on CPU, fast on GPU) so every strategy uses the same kernel.
    set_attention(model, cfg.attention)
    return model


def weight_source(cfg: ModelConfig, model: nn.Module, seed: int) -> Weights:
    """Where `model`'s weights come from: model.path's safetensors (hf_local), else a seeded init."""
    return Weights(model, seed, cfg.path if cfg.kind == "hf_local" else None)


def build_model(cfg: ModelConfig, vocab_size: int | None, seed: int) -> nn.Module:
    """fp32 model on CPU, identical on every rank and world size, before any wrapping: the meta
    model materialized whole (tests, benches and single-process tools; the trainer lets each
    strategy materialize only what its rank keeps)."""
    model = build_meta_model(cfg, vocab_size)
    materialize_full(model, weight_source(cfg, model, seed), torch.device("cpu"))
    return model


def decoder_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of repeated blocks that FSDP shards, compile compiles and activation
    checkpointing wraps (through a peft wrapper too: PeftModel -> the transformers model)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no .model.layers: cannot find its decoder blocks")
    return layers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(decoder_stack(model))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
