"""trainer.loss: the chunked loss equals the plain one (and transformers' own), gradients included."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import train.loss as L
from tests.helpers import PY, REPO, child_env, free_port

VOCAB, SEQ = 300, 16


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, VOCAB, (2, SEQ))
    hf_labels = ids.clone()
    hf_labels[0, :5] = -100  # a masked prompt, as chat batches carry
    hf_labels[1, 9:] = -100
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = hf_labels[:, 1:]  # our batches hold labels already shifted
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(SEQ).repeat(2, 1)}
    return model, batch, hf_labels


def _loss_and_grads(model, batch, kind):
    model.zero_grad(set_to_none=True)
    loss = L.lm_loss(model, batch, kind)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_equals_plain_and_transformers(model_and_batch, monkeypatch):
    model, batch, hf_labels = model_and_batch
    monkeypatch.setattr(L, "CHUNK_LOGITS", VOCAB * 5)  # 5-token chunks: 7 chunks, the last one short
    plain, plain_grads = _loss_and_grads(model, batch, "plain")
    chunked, chunked_grads = _loss_and_grads(model, batch, "chunked")
    oracle = model(input_ids=batch["input_ids"], labels=hf_labels).loss  # transformers' causal-LM loss
    torch.testing.assert_close(plain, oracle.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_small_batch_in_one_piece_equals_chunk_loop(model_and_batch, monkeypatch):
    """Up to SMALL_LOGITS the chunked loss skips its chunk loop: same loss and gradients as the loop."""
    model, batch, _ = model_and_batch
    assert 2 * SEQ * VOCAB <= L.SMALL_LOGITS
    one_piece, one_piece_grads = _loss_and_grads(model, batch, "chunked")
    monkeypatch.setattr(L, "SMALL_LOGITS", 0)  # every micro-batch through the chunk loop
    looped, looped_grads = _loss_and_grads(model, batch, "chunked")
    torch.testing.assert_close(one_piece, looped, rtol=1e-6, atol=1e-6)
    for name, grad in looped_grads.items():
        torch.testing.assert_close(one_piece_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sum_and_count(model_and_batch):
    model, batch, _ = model_and_batch
    with torch.no_grad():
        total = L.token_loss_sum(model, batch, "chunked")
        mean = L.lm_loss(model, batch, "plain")
    assert int(total.tokens) == int((batch["labels"] != -100).sum()) == 2 * (SEQ - 1) - 4 - 7
    torch.testing.assert_close(total.sum / total.tokens, mean)


def test_chunked_never_builds_full_logits(model_and_batch, monkeypatch):
    """Twin of the equality test: the head projected no position in the model's forward (the loss
    projects the hidden states itself), not the whole batch; a micro-batch of few logits is
    projected whole, as `plain` does (SMALL_LOGITS)."""
    model, batch, _ = model_and_batch
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        L.lm_loss(model, batch, "chunked")
    finally:
        hook.remove()
    assert shapes == [(2, SEQ, VOCAB)]
    monkeypatch.setattr(L, "SMALL_LOGITS", 0)  # past the one-piece size: the chunk loop
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        L.lm_loss(model, batch, "chunked")
        L.lm_loss(model, batch, "plain")
    finally:
        hook.remove()
    assert shapes == [(2, 0, VOCAB), (2, SEQ, VOCAB)]


def test_fused_needs_cuda(model_and_batch):
    model, batch, _ = model_and_batch
    with pytest.raises(RuntimeError, match="trainer.loss=fused needs a CUDA device"):
        L.lm_loss(model, batch, "fused")


def test_wrapped_models_match_plain(tmp_path):
    """DDP, FSDP2 and ZeRO-3 on 2 gloo ranks: one step with each loss, then the same next loss."""
    import subprocess

    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "support" / "dist_loss_check.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("MATCH") == 3, proc.stdout
