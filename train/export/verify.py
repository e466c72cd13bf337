"""Check an export by reloading it with transformers and comparing logits with the training model.

The reference is either logits the training loop computed with the live (possibly sharded)
model on `verify_batch(vocab_size)`, or, offline, a model rebuilt from the checkpoint's fp32
weights. The export is loaded in its own dtype on CPU, exactly as a user would load it.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
VERIFY_BATCH, VERIFY_LEN, VERIFY_SEED = 2, 16, 20240229


class ExportVerificationError(RuntimeError):
    """The reloaded export does not reproduce the training model; nothing was published."""


class NonFiniteWeightsError(ExportVerificationError):
    """A weight is NaN or infinite: never published, whatever export.verify says."""


def check_finite(name: str, tensor: torch.Tensor, source: Path, dtype: str) -> None:
    """Refuse a NaN/inf weight by name (also one that overflows the export dtype, e.g. fp16)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise NonFiniteWeightsError(
        f"tensor {name} of {source} holds {nan} NaN and {inf} inf values (of {tensor.numel()}, in export dtype "
        f"{dtype}): the weights diverged{' or overflow ' + dtype if dtype == 'fp16' else ''}; nothing was "
        "published (this check runs even with export.verify=false). Export an earlier checkpoint")


def verify_batch(vocab_size: int, max_positions: int | None = None) -> torch.LongTensor:
    """The fixed, seeded [2, 16] batch of token ids both sides of the comparison run on."""
    length = min(VERIFY_LEN, max_positions or VERIFY_LEN)
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randint(0, vocab_size, (VERIFY_BATCH, length), generator=gen, dtype=torch.long)


def tolerance(dtype: str, reference_precision: str = "fp32", override: float | None = None) -> float:
    """Relative tolerance on max |logit diff| / max |reference logit| for an export dtype."""
    if override is not None:
        return override
    return max(TOLERANCE[dtype], TOLERANCE.get(reference_precision, TOLERANCE["fp32"]))


@torch.no_grad()
def reference_logits_from_checkpoint(config: Any, weights: Any, names: dict[str, str],
                                     batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a model built from `config` with the checkpoint's weights.

    `names` maps export names to checkpoint names. The model is built on the meta device and
    each weight is loaded in place, so only one fp32 copy of the model exists.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: weights.load(src).float() for name, src in names.items()}
    model.load_state_dict(state, strict=False, assign=True)  # leftovers are caught below
    del state
    model.tie_weights()
    materialize_buffers(model)
    model.eval()
    logits = model(input_ids=batch).logits.float()
    del model
    gc.collect()
    return logits


def materialize_buffers(model: Any) -> None:
    """Non-persistent buffers (rotary inv_freq) are still on meta: rebuild their module on CPU."""
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if metas and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            for name in metas:
                module.register_buffer(name, getattr(fresh, name), persistent=False)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    leftover += [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ExportVerificationError(f"checkpoint lacks weights for {leftover}: cannot rebuild the model")


@torch.no_grad()
def check_export(export_dir: Path, reference: torch.Tensor, batch: torch.Tensor, tol: float,
                 new_tokens: int, tokenizer: Any | None) -> dict[str, Any]:
    """Reload `export_dir`, compare logits with `reference`, generate a few tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the training log
    try:
        model = AutoModelForCausalLM.from_pretrained(str(export_dir), local_files_only=True, dtype="auto")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    loaded_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    logits = model(input_ids=batch).logits.float()
    if logits.shape != reference.shape:
        raise ExportVerificationError(f"export logits have shape {tuple(logits.shape)}, the training "
                                      f"model's {tuple(reference.shape)}")
    diff = (logits - reference.float()).abs().max().item()
    scale = max(reference.abs().max().item(), 1e-6)
    report: dict[str, Any] = {
        "batch_shape": list(batch.shape), "loaded_dtype": loaded_dtype, "max_abs_diff": diff,
        "relative_diff": diff / scale, "tolerance": tol,
        "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "passed": diff / scale <= tol and bool(torch.isfinite(logits).all()),
    }
    if new_tokens > 0:
        prompt = batch[:1, : max(1, batch.shape[1] // 2)]
        pad = model.generation_config.pad_token_id
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad if pad is not None else 0)
        report["generated_ids"] = out[0, prompt.shape[1]:].tolist()
        if tokenizer is not None:
            report["generated_text"] = tokenizer.decode(report["generated_ids"])
    del model
    gc.collect()
    return report
