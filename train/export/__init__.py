"""Serving exports: Hugging Face directories (and GGUF) from any strategy's checkpoint.

Public API (imported lazily so that `train.config` can import the schema cheaply):
`export_checkpoint(checkpoint_dir, out_dir, cfg, reference_logits=None) -> dict`,
`verify_batch(vocab_size) -> LongTensor`, `ExportHook` (the training loop's hook),
`verify_dir(export_dir)` (re-hash against export.json).
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "export_checkpoint": "train.export.hf_export",
    "verify_batch": "train.export.verify",
    "ExportVerificationError": "train.export.verify",
    "ExportHook": "train.export.hook",
    "verify_dir": "train.export.files",
    "ExportVerifyError": "train.export.files",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train.export' has no attribute {name!r}")


__all__ = list(_LAZY)
