"""Next-token cross-entropy without full-vocabulary fp32 logits (`trainer.loss`).

`plain` runs the model to logits and upcasts them all to fp32: for a 128k vocabulary at 2 x 8192
tokens that is 8 GiB before its gradient. `chunked` runs the model through its wrapper (so DDP,
FSDP2 and DeepSpeed hooks fire) keeping no logits (`logits_to_keep` an empty index: the head
projects nothing there), takes the final hidden states, and projects + scores them a chunk of
tokens at a time, computing the gradients of each chunk right away (as Liger's fused linear
cross-entropy does) so that only one chunk of logits ever exists. Under DeepSpeed ZeRO-3 the
head's weight is whole only inside the head's own forward/backward, so there the head module is
called per chunk with activation recompute instead. `fused` is Liger's kernel itself, on CUDA. A
micro-batch of at most SMALL_LOGITS logits is scored as `plain` scores it (`_few_logits`).

Every kind returns the *sum* of token losses and the number of labelled tokens
(`token_loss_sum`), so the loop can normalise over the global batch; `lm_loss` is the mean.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import FSDPModule

from train.upcast import BlockedWeight

LossKind = Literal["plain", "chunked", "fused"]
IGNORE = -100
# Tokens per chunk: 2^25 logits (128 MiB in fp32) whatever the vocabulary.
CHUNK_LOGITS = 2**25
# At most this many logits (4 MiB in fp32), a micro-batch is scored in one piece by autograd's own
# kernels: memory does not matter there, and the chunk loop's ~30 small ops cost more than the math.
SMALL_LOGITS = 2**20


class TokenLoss(NamedTuple):
    sum: torch.Tensor
    """Sum of the per-token losses (fp32 scalar, differentiable)."""
    tokens: torch.Tensor
    """Number of labelled tokens (label != -100), an int64 scalar."""


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: LossKind = "plain") -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels are pre-shifted)."""
    total = token_loss_sum(model, batch, kind)
    return total.sum / total.tokens


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], kind: LossKind = "plain") -> TokenLoss:
    """Sum of token losses and the count of labelled tokens of one micro-batch.

    `model` may be wrapped (DDP, DeepSpeed engine, FSDP2, peft): it is always called through
    its own `__call__`, so sharded parameters are gathered and gradient hooks fire."""
    labels = batch["labels"]
    tokens = (labels != IGNORE).sum()
    if kind == "plain" or not _supports_hidden_only(model) or (kind == "chunked" and _few_logits(model, batch)):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        return TokenLoss(total, tokens)
    # No position kept: the head projects nothing in the model's own forward (its output is not
    # used), so no gathered or upcast copy of the output matrix is made there (issue 17).
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                output_hidden_states=True, logits_to_keep=batch["input_ids"].new_empty(0))
    hidden = out.hidden_states[-1]
    hidden = hidden.reshape(-1, hidden.size(-1))
    head = output_head(model)
    if kind not in ("chunked", "fused"):
        raise ValueError(f"trainer.loss={kind!r}: use plain, chunked or fused")
    if hasattr(head.weight, "ds_id") and head.weight.requires_grad:
        return TokenLoss(_module_chunks_sum(head, hidden, labels.reshape(-1)), tokens)
    if hasattr(head.weight, "ds_id"):
        # A frozen ZeRO-3 head (adapter runs): DeepSpeed does not gather it again for a recompute
        # in backward, so gather it once here; only the hidden states need a gradient.
        import deepspeed

        with deepspeed.zero.GatheredParameters([head.weight]):
            total = linear_cross_entropy_sum(hidden, head.weight, labels.reshape(-1))
        return TokenLoss(total, tokens)
    # autograd keeps the weight for backward in Liger's kernel, not in the chunk loop
    with _full_weight(model, head, kept=kind == "fused") as weight:
        if kind == "fused":
            total = _liger_sum(hidden, weight, labels.reshape(-1))
        else:
            total = linear_cross_entropy_sum(hidden, weight, labels.reshape(-1))
    return TokenLoss(total, tokens)


def _few_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """At most SMALL_LOGITS logits (and no more than a chunk): the micro-batch is scored as `plain`
    scores it, in one piece by the model's own head and autograd's kernels. Memory does not matter
    there, and the chunk loop's ~30 small ops per chunk cost more than the math. A head stored
    narrower than the compute is upcast in blocks by the head itself (train/upcast.py)."""
    return batch["input_ids"].numel() * output_head(model).out_features <= min(SMALL_LOGITS, CHUNK_LOGITS)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, labels_i) over labelled rows, one chunk of rows at a time."""
    chunk = chunk or max(1, CHUNK_LOGITS // weight.size(0))
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk, need, projection_dtype(hidden))


def projection_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the output projection computes in: the autocast dtype where autocast is on.

    Under DDP (autocast over fp32 parameters) the final hidden states come out of the last norm
    in fp32; projecting them in fp32 would run the largest matmul of the model at the fp32 rate,
    a few times slower on tensor cores than the bf16 one the rest of the model uses. FSDP2
    (MixedPrecisionPolicy) and DeepSpeed bf16 already hand over bf16 hidden states."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.dtype == torch.float32:
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _module_chunks_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunks: int = 8) -> torch.Tensor:
    """ZeRO-3: the head's weight exists whole only inside the head's own forward and backward
    (DeepSpeed gathers it in its module hooks), so call the module on each chunk and recompute
    the chunk in backward (torch.utils.checkpoint). Fewer, larger chunks than the fused path:
    each chunk gathers the head twice."""
    size = max(CHUNK_LOGITS // head.weight.ds_shape[0] if hasattr(head.weight, "ds_shape") else 1,
               -(-hidden.size(0) // chunks))

    def chunk_sum(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), size):
        h, y = hidden[start:start + size], labels[start:start + size]
        total = total + (torch.utils.checkpoint.checkpoint(chunk_sum, h, y, use_reentrant=False)
                         if torch.is_grad_enabled() else chunk_sum(h, y))
    return total


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes the loss *and* both gradients chunk by chunk; backward only scales them.

    No chunk's logits survive the loop, so peak memory is one chunk of logits plus the
    gradients, instead of the whole [tokens, vocab] fp32 block and its softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, need_grads: bool, dtype: torch.dtype):
        # The projection runs in `dtype` (autocast's, see projection_dtype); logits and softmax in
        # fp32; each gradient is handed back in its input's own dtype.
        w = BlockedWeight(weight, dtype)  # no fp32 copy of a narrower head (train/upcast.py)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grads and ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if need_grads and ctx.needs_input_grad[1] else None)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk):
                h, y = hidden[start:start + chunk].to(dtype), labels[start:start + chunk]
                logits = w.times_t(h, torch.float32)
                lse = torch.logsumexp(logits, dim=-1)
                valid = y != IGNORE
                target = y.clamp(min=0)
                picked = logits.gather(1, target[:, None])[:, 0]
                total += ((lse - picked) * valid).sum()
                if grad_h is None and grad_w is None:
                    continue
                probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, reusing the logits' memory
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs *= valid[:, None]
                if grad_h is not None:
                    grad_h[start:start + chunk] = w.times(probs.to(dtype))
                if grad_w is not None:
                    grad_w += (probs.t().to(dtype) @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def output_head(model: nn.Module) -> nn.Linear:
    """The output projection of a (possibly wrapped) causal LM."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"{type(base).__name__}'s output head is {type(head).__name__}, not a bias-free "
                         "nn.Linear: use trainer.loss=plain")
    return head


def unwrap(model: nn.Module) -> nn.Module:
    """DDP and DeepSpeed keep the model in `.module` (the DeepSpeed engine also forwards attribute
    lookups, but its own forward takes only *args); FSDP2 and peft wrap in place."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _supports_hidden_only(model: nn.Module) -> bool:
    """Only models whose forward takes `logits_to_keep` can skip the full logits."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inner = getattr(base, "get_base_model", lambda: base)()  # peft: the transformers model
    return isinstance(head, nn.Linear) and head.bias is None and _takes_logits_to_keep(inner.forward)


def _takes_logits_to_keep(forward) -> bool:
    """`inspect.signature` costs ~30 us, asked once per micro-batch: remembered per function."""
    function = getattr(forward, "__func__", None)  # a bound method: its class's function
    if function is None:
        return "logits_to_keep" in inspect.signature(forward).parameters
    return _function_takes_logits_to_keep(function)


@functools.lru_cache(maxsize=None)
def _function_takes_logits_to_keep(function) -> bool:
    return "logits_to_keep" in inspect.signature(function).parameters


@contextlib.contextmanager
def _full_weight(model: nn.Module, head: nn.Linear, kept: bool = False):
    """The whole output matrix on this rank, as the parameter its gradient must reach.

    FSDP2 reshards the root (embedding, final norm, head) after forward: unshard it again
    through its public API; the gradient then lands on the unsharded parameter, which FSDP
    reduce-scatters after backward as usual. A frozen head in its own unit (adapter runs) is
    resharded right away when the chunk loop computed every gradient in its forward and kept none
    of the weight (`kept=False`), so backward would only hold the whole head for nothing; not when
    autograd kept the weight for backward (`kept`: the one-piece loss, Liger). (ZeRO-3 goes
    through `_module_chunks_sum`.)"""
    weight = head.weight
    owner = next((m for m in (head, unwrap(model)) if isinstance(m, FSDPModule)), None)
    if owner is None:
        yield weight
        return
    owner.unshard()
    yield head.weight
    if not torch.is_grad_enabled() or (owner is head and not head.weight.requires_grad and not kept):
        owner.reshard()  # a frozen head's part of backward was done in the loss's forward


def _liger_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (Triton, CUDA only), summed over labelled tokens."""
    if hidden.device.type != "cuda":
        raise RuntimeError("trainer.loss=fused needs a CUDA device (Liger's Triton kernel): "
                           "use trainer.loss=chunked on CPU")
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )
    except ImportError as e:
        raise RuntimeError("trainer.loss=fused needs liger-kernel: pip install liger-kernel "
                           "(or use trainer.loss=chunked)") from e
    dtype = projection_dtype(hidden)
    return liger_fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, ignore_index=IGNORE,
                                            reduction="sum")
