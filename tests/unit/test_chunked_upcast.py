"""The chunked loss on a head stored narrower than it computes (a frozen bf16 head in the fp32 loss
of a CPU run): the same loss and hidden-state gradient as on a whole fp32 copy of the head, and
no such copy is ever made (issue 17: it was twice the head's bytes at the step's peak)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train.loss as L

VOCAB, HIDDEN, TOKENS = 50, 16, 10


class Upcasts(TorchDispatchMode):
    """Element counts of every bf16 -> fp32 copy."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                and out.dtype == torch.float32:
            self.sizes.append(out.numel())
        return out


def _case():
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN).to(torch.bfloat16)  # frozen: no gradient wanted
    labels = torch.randint(0, VOCAB, (TOKENS,))
    labels[3] = L.IGNORE
    return hidden, weight, labels


def test_blocked_upcast_equals_a_whole_fp32_head(monkeypatch):
    hidden, weight, labels = _case()
    want = F.cross_entropy(hidden @ weight.float().t(), labels, ignore_index=L.IGNORE, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    monkeypatch.setattr(L, "UPCAST_BLOCK", 7 * HIDDEN)  # 7 rows a block: 8 blocks, the last one short
    got = L.linear_cross_entropy_sum(hidden, weight, labels, chunk=4)  # 3 chunks of tokens, the last short
    (got_grad,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_the_head_is_never_upcast_whole(monkeypatch):
    """Twin of the equality: the head went to fp32 only in blocks of at most UPCAST_BLOCK elements,
    and every row of it did (per chunk: once for the logits, once for the hidden states' gradient)."""
    hidden, weight, labels = _case()
    monkeypatch.setattr(L, "UPCAST_BLOCK", 7 * HIDDEN)
    with Upcasts() as seen:
        L.linear_cross_entropy_sum(hidden, weight, labels, chunk=4).backward()
    heads = [n for n in seen.sizes if n % HIDDEN == 0 and n >= HIDDEN]  # slices of the head
    assert heads and max(heads) <= 7 * HIDDEN, seen.sizes
    assert sum(heads) == 3 * 2 * VOCAB * HIDDEN, seen.sizes
