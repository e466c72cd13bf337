"""Frozen weights stored narrower than they compute (a bf16 base under LoRA in the fp32 step of a CPU
run, train/upcast.py): the chunked loss's head and the base's projections give the same loss and
gradients as a whole fp32 copy of them, and no such copy is ever made (issue 17: it was twice the
weight's bytes at the step's peak)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train.loss as L
import train.upcast as U

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
    monkeypatch.setattr(U, "UPCAST_BLOCK", 7 * HIDDEN)  # 7 rows a block: 8 blocks, the last one short
    got = L.linear_cross_entropy_sum(hidden, weight, labels, chunk=4)  # 3 chunks of tokens, the last short
    (got_grad,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_the_head_is_never_upcast_whole(monkeypatch):
    """Twin of the equality: the head went to fp32 only in blocks of at most UPCAST_BLOCK elements,
    and every row of it did (per chunk: once for the logits, once for the hidden states' gradient)."""
    hidden, weight, labels = _case()
    monkeypatch.setattr(U, "UPCAST_BLOCK", 7 * HIDDEN)
    with Upcasts() as seen:
        L.linear_cross_entropy_sum(hidden, weight, labels, chunk=4).backward()
    heads = [n for n in seen.sizes if n % HIDDEN == 0 and n >= HIDDEN]  # slices of the head
    assert heads and max(heads) <= 7 * HIDDEN, seen.sizes
    assert sum(heads) == 3 * 2 * VOCAB * HIDDEN, seen.sizes


def _lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            p.data.normal_(0, 0.05)  # LoRA's B starts at zero: make every path carry a gradient
    return model


def _step(model) -> tuple[torch.Tensor, dict]:
    ids = torch.arange(24).reshape(2, 12) % 96
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_linears_upcast_in_blocks_and_match_a_whole_fp32_base(monkeypatch):
    """A bf16 base under LoRA computing in fp32 (train/strategies/parallelize.py apply_frozen_upcast):
    the loss and the adapter's gradients of an fp32 copy of the whole base, while no frozen weight
    is ever upcast whole."""
    import train.strategies.parallelize as par

    model = _lora_model()
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.data = p.data.float()
    want_loss, want_grads = _step(reference)
    monkeypatch.setattr(U, "UPCAST_BLOCK", 7 * 64)  # 7 rows of a 64-wide weight, 3 of the 128-wide down_proj
    par.apply_frozen_upcast(model, torch.float32)
    with Upcasts() as seen:
        got_loss, got_grads = _step(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    linears = {m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    assert linears and not linears & set(seen.sizes), "a frozen weight was upcast whole"
    assert 7 * 64 in seen.sizes and 3 * 128 in seen.sizes, seen.sizes  # blocks of both widths, forward and back


def test_whole_upcasts_are_seen_when_a_block_holds_a_whole_weight(monkeypatch):
    """Twin of the test above: with a block larger than every weight, each frozen weight goes to
    fp32 in one piece, and the detector sees those copies."""
    import train.strategies.parallelize as par

    model = _lora_model()
    par.apply_frozen_upcast(model, torch.float32)
    with Upcasts() as seen:
        _step(model)
    linears = {m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    assert linears <= set(seen.sizes), (linears, seen.sizes)


def test_the_planner_counts_the_block_that_is_upcast():
    from launch.plan import UPCAST_BYTES

    assert UPCAST_BYTES == 4 * U.UPCAST_BLOCK
