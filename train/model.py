"""Build the plain model: a Llama-style decoder from config, or a local HF checkpoint.

Parallelism is applied afterwards by a strategy (STYLE 2); this file knows nothing of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from train.config import ModelConfig


def hf_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std, attention_dropout=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_model(cfg: ModelConfig, vocab_size: int | None, seed: int) -> nn.Module:
    """fp32 model on CPU, identical on every rank (seeded), before any wrapping."""
    torch.manual_seed(seed)
    if cfg.kind == "hf_local":
        assert cfg.path is not None
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True,
                                            trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, config=config, local_files_only=True, trust_remote_code=cfg.trust_remote_code,
            torch_dtype=torch.float32)
    else:
        vocab = cfg.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size is null and the data gives no vocabulary size: "
                             "set model.vocab_size")
        model = LlamaForCausalLM(hf_config(cfg, vocab))
    model.config.use_cache = False
    # sdpa is exact on CPU and fast on GPU; set explicitly so every strategy uses the same kernel.
    model.config._attn_implementation = "sdpa"
    return model


def decoder_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of repeated blocks that FSDP shards, compile compiles and activation
    checkpointing wraps."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no .model.layers: cannot find its decoder blocks")
    return layers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(decoder_stack(model))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels are pre-shifted)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1),
                           ignore_index=-100)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
