"""A bf16 frozen base computing in fp32 (LoRA on CPU): the same numbers whether autograd keeps
the fp32 copies or the bf16 parameters, and only the second keeps no copy alive (issue 17)."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import train.strategies.parallelize as par

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def run(model: torch.nn.Module, saved_low: bool, copies: list) -> tuple[float, dict, int]:
    """One forward and backward; how many fp32 copies of frozen weights autograd held after forward."""
    model = copy.deepcopy(model)
    par.apply_frozen_upcast(model, torch.float32, saved_low=saved_low)
    for module in model.modules():  # after the upcast hook: the fp32 copies it made
        if any(p is not None and not p.requires_grad and p.dtype == torch.bfloat16
               for p in module._parameters.values()) and not isinstance(module, torch.nn.Embedding):
            module.register_forward_pre_hook(
                lambda m, a: copies.extend(weakref.ref(p) for p in m._parameters.values()
                                      if p is not None and not p.requires_grad and p.dtype == torch.float32))
    ids = torch.arange(24).reshape(2, 12) % 96
    loss = model(input_ids=ids, labels=ids).loss
    held = sum(r() is not None for r in copies)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, held


def test_saving_the_bf16_weight_gives_the_same_loss_and_grads_and_keeps_no_fp32_copy(lora_model):
    copies_low, copies_fp32 = [], []
    loss_low, grads_low, held_low = run(lora_model, True, copies_low)
    loss_fp32, grads_fp32, held_fp32 = run(lora_model, False, copies_fp32)
    assert loss_low == loss_fp32
    assert grads_low.keys() == grads_fp32.keys() and grads_low
    for name in grads_low:
        torch.testing.assert_close(grads_low[name], grads_fp32[name], rtol=0, atol=0)
    # the twin: without the hooks autograd keeps fp32 copies of the frozen weights until backward
    assert held_fp32 >= 4, f"only {held_fp32} of {len(copies_fp32)} copies held: the twin shows nothing"
    assert held_low == 0, f"{held_low} fp32 copies of frozen weights still alive after forward"


def test_an_embedding_is_looked_up_in_bf16_and_its_rows_upcast(lora_model):
    model = copy.deepcopy(lora_model)
    par.apply_frozen_upcast(model, torch.float32)
    embed = model.get_input_embeddings()
    out = embed(torch.tensor([[1, 5, 7]]))
    assert out.dtype == torch.float32 and embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(out, embed.weight[[1, 5, 7]].float().unsqueeze(0), rtol=0, atol=0)
