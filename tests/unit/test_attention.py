"""model.attention: a packed batch gives each document the logits it has when run alone."""
from __future__ import annotations

import pytest
import torch

from train.attention import set_attention
from train.config import ModelConfig
from train.model import build_model

LENGTHS = [5, 7, 4]  # three documents packed into one 16-token row


@pytest.fixture(scope="module")
def packed():
    model = build_model(ModelConfig(vocab_size=100), None, seed=0).eval()
    ids = torch.randint(0, 100, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).repeat(2, 1)
    return model, ids, pos


def _alone(model, ids):
    """Each document on its own (a plain causal mask), concatenated back into the packed layout."""
    set_attention(model, "sdpa")
    out, start = [], 0
    for n in LENGTHS:
        out.append(model(input_ids=ids[:, start:start + n]).logits)
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_packed_equals_documents_alone(packed, kind, monkeypatch):
    model, ids, pos = packed
    if kind == "flex":
        # FlexAttention runs on CPU in forward only. transformers compiles the kernel and the mask
        # builder with inductor, which takes minutes on two cores: use the same two functions uncompiled.
        import transformers.integrations.flex_attention as hf_flex
        import transformers.masking_utils as hf_masks
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
        monkeypatch.setattr(hf_masks, "create_block_mask",
                            lambda *a, **k: create_block_mask(*a, **{**k, "_compile": False}))
    with torch.no_grad():
        reference = _alone(model, ids)
        set_attention(model, kind)
        assert model.config._attn_implementation == {"sdpa": "sdpa", "flex": "flex_attention"}[kind]
        got = model(input_ids=ids, position_ids=pos).logits
        unmasked = model(input_ids=ids).logits  # twin: without restarting positions the documents mix
    set_attention(model, "sdpa")
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, LENGTHS[0]:], reference[:, LENGTHS[0]:], atol=1e-3)


def test_flash_needs_cuda_and_package(packed):
    if torch.cuda.is_available():
        pytest.skip("checked on GPU by tests/system/test_gpu.py")
    with pytest.raises(ValueError, match="model.attention=flash needs a CUDA GPU"):
        set_attention(packed[0], "flash")
