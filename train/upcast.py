"""A frozen weight stored narrower than the computation (a bf16 base under LoRA on a CPU rank,
which computes in fp32): products with it upcast UPCAST_BLOCK elements of its rows at a time, so
that no fp32 copy of the whole matrix exists (issue 17: such a copy is twice the weight's bytes,
and at the step's peak it is the largest transient a rank holds besides the gathered block).

Two users: the chunked loss's output head (train/loss.py) and every frozen `nn.Linear` of the
base (`frozen_linear`, installed by train/strategies/parallelize.py `apply_frozen_upcast`).
Each output element is the same dot product as with a whole copy; the input's gradient sums the
output features in blocks.
"""
from __future__ import annotations

import torch

# 1 MiB of fp32 a block, not a copy of the matrix (4 MiB held 6 MiB more at the peak of a
# 2048-wide LoRA step on CPU ranks; the blocked products are 6-28% slower: docs/BENCHMARKS.md).
UPCAST_BLOCK = 2**18


class BlockedWeight:
    """`weight` [out, in] as `dtype` in products: cast whole once when that is no wider (bf16 on a
    GPU, autocast's downcast), upcast a block of rows at a time when it is wider."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight, self.dtype = weight, dtype
        self.whole = None if dtype.itemsize > weight.dtype.itemsize else weight.to(dtype)
        rows = max(1, UPCAST_BLOCK // max(1, weight.size(1)))
        self.blocks = [(a, min(a + rows, weight.size(0))) for a in range(0, weight.size(0), rows)]

    def times_t(self, h: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """h @ weight.T for h [..., in], in `out_dtype` (default `dtype`): a tensor of its own
        [..., out], not a view (FSDP2 warns about a module that returns a view)."""
        out_dtype = out_dtype or self.dtype
        if h.numel() == 0:  # the output head under the chunked loss, which keeps no position
            return h.new_empty(*h.shape[:-1], self.weight.size(0), dtype=out_dtype)
        if self.whole is not None:
            return (h @ self.whole.t()).to(out_dtype)
        out = torch.empty(*h.shape[:-1], self.weight.size(0), dtype=out_dtype, device=h.device)
        for a, b in self.blocks:
            out[..., a:b] = h @ self.weight[a:b].to(self.dtype).t()
        return out

    def times(self, p: torch.Tensor) -> torch.Tensor:
        """p @ weight for p [tokens, out] in `dtype`."""
        if self.whole is not None:
            return p @ self.whole
        out = torch.zeros(p.size(0), self.weight.size(1), dtype=self.dtype, device=p.device)
        for a, b in self.blocks:
            out += p[:, a:b] @ self.weight[a:b].to(self.dtype)
        return out


class _FrozenLinear(torch.autograd.Function):
    """x @ weight.T (+ bias) with a frozen `weight`: backward keeps the stored parameter (not a
    copy, not the input: a frozen weight needs no input for any gradient) and computes the input's
    gradient block by block too.

    The parameter is held on `ctx`, not saved through autograd: a sharding engine gathers it again
    for the module's backward, into the same parameter, and in between it may be released. A saved
    tensor would be checked by activation checkpointing after a recomputation, and ZeRO-3 releases
    a weight by giving it an empty `.data` (shape [0]): to pass that check DeepSpeed keeps every
    frozen weight a recomputation gathers until a later backward hook, a whole decoder block at
    once (train/strategies/deepspeed.py `_release_after_recompute`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        out = BlockedWeight(weight, x.dtype).times_t(x)
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight
        grad_x = BlockedWeight(weight, grad_out.dtype).times(grad_out.reshape(-1, grad_out.size(-1)))
        return grad_x.view(*grad_out.shape[:-1], weight.size(1)), None, None


def frozen_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module`'s forward on `x` in x's dtype, its frozen weight (and bias) as stored."""
    return _FrozenLinear.apply(x, module.weight, module.bias)
