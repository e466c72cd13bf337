"""Attention kernel for packed batches (`model.attention`).

Packed batches restart their position ids at every document. transformers turns those
restarts into the document mask itself, once per forward for all layers: a block-diagonal
boolean mask for SDPA (portable, but O(seq^2) memory and no flash kernel), a FlexAttention
BlockMask for `flex_attention` (only the non-empty blocks are computed), and cu_seqlens for
flash-attn's varlen kernel. So choosing the kernel is all this file does, with a clear error
where the kernel cannot run.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

KERNELS = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def set_attention(model: nn.Module, kind: str) -> None:
    """Point every attention layer of a transformers model at the kernel named by `kind`."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention={kind!r}: use sdpa, flex or flash")
    if kind == "flash":
        if not torch.cuda.is_available():
            raise ValueError("model.attention=flash needs a CUDA GPU (flash-attn's varlen kernel): "
                             "use model.attention=sdpa or flex")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attention=flash needs the flash-attn package (pip install flash-attn "
                             "--no-build-isolation): or use model.attention=flex")
    model.set_attn_implementation(KERNELS[kind])
    # The per-block mask is built from position ids only without a KV cache (training).
    model.config.use_cache = False
