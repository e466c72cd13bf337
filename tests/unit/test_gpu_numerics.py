"""GPU numerics checked on CPU: the chunked loss projects in the autocast dtype, TF32 is a setting,
the peak-FLOPs table tells the Hopper boards apart, and one GPU refuses two ranks up front."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM

import train.loss as L
from data_pipeline.schema import ConfigError
from train.dist import check_gpu_count, set_tf32
from train.tracking.flops import device_peak_flops

VOCAB = 300


class ProjectionDtypes(TorchFunctionMode):
    """Records the dtype of every 2-D matmul whose output has VOCAB columns (the output projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "linear") and \
                isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == VOCAB:
            self.seen.append(out.dtype)
        return out


@pytest.mark.parametrize("autocast", [True, False])
def test_chunked_projection_runs_in_the_autocast_dtype(autocast, monkeypatch):
    """DDP's case: fp32 parameters under bf16 autocast hand fp32 hidden states to the loss. The
    projection must still run in bf16 (the twin without autocast shows the hook sees fp32 too),
    and the gradients come back in the parameters' fp32."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).repeat(2, 1)}
    monkeypatch.setattr(L, "SMALL_LOGITS", 0)  # a small micro-batch: the chunk loop, not plain's one piece
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), ProjectionDtypes() as rec:
        total = L.token_loss_sum(model, batch, "chunked")
    total.sum.backward()
    assert rec.seen == [torch.bfloat16 if autocast else torch.float32]
    assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = L.token_loss_sum(model, batch, "plain").sum
    assert torch.allclose(total.sum.detach(), plain, rtol=2e-2)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H20", 148e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Unknown GPU", None)])
def test_peak_flops_per_board(name, peak):
    assert device_peak_flops(name) == peak


def test_fewer_gpus_than_local_ranks_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in (0, 1):  # every rank refuses, so rank 0 prints it
        with pytest.raises(ConfigError, match=r"2 ranks on this node but 1 GPU\(s\).*--nproc_per_node 1.*trainer.device=cpu"):
            check_gpu_count(rank, gpus=1)
    check_gpu_count(1, gpus=2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    check_gpu_count(0, gpus=1)
    with pytest.raises(ConfigError):
        check_gpu_count(3, gpus=2)


def test_tf32_is_a_setting():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        set_tf32(True, torch.device("cpu"))
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        set_tf32(False, torch.device("cpu"))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
