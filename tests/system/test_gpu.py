"""GPU paths (nccl, bf16, ddp/fsdp/zero3 on one GPU): run where a GPU is lent, skipped elsewhere.

The end-to-end runs check the curve; the in-process twins ask the engines what they did: the
backend is nccl, the blocks compute in bf16, and the offload strategies keep on the host what
they promise to (on a GPU that is a real difference; tests/unit/test_strategy_features.py covers CPU).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from tests.helpers import TINY, losses, run_train
from tests.helpers.inprocess import batch, build, one_rank_group
from train.metrics import read_metrics
from train.model import decoder_layers
from train.step import forward_backward as step_backward

COMPILED_BLOCKS = ("OptimizedModule", "FSDPOptimizedModule")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_one_gpu_bf16_nccl(strategy, tmp_path):
    run_train([*TINY, f"strategy={strategy}", "trainer.max_steps=10", "trainer.global_batch_size=4",
               "trainer.micro_batch_size=2", f"run.dir={tmp_path}"], nproc=1)
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 11)) and curve[10] < curve[1]
    last = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert last["mem_peak_gb"] > 0


@pytest.fixture(scope="module")
def info():
    with one_rank_group("auto") as info:
        yield info


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_blocks_compute_in_bf16_over_nccl(info, tmp_path, strategy):
    assert info.device.type == "cuda" and dist.get_backend() == "nccl"
    model, engine = build(info, tmp_path, f"strategy={strategy}")
    seen: list[torch.dtype] = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for layer in decoder_layers(model)]
    try:
        loss = step_backward(engine, [batch(info.device)], info.device)[0]
    finally:
        for h in hooks:
            h.remove()
    assert seen == [torch.bfloat16] * len(decoder_layers(model)) and torch.isfinite(loss)
    masters = engine.optim.optimizer.param_groups[0]["params"] if strategy != "zero3" else \
        engine.engine.optimizer.fp32_partitioned_groups_flat
    assert masters and all(p.dtype == torch.float32 for p in masters)  # fp32 master weights


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@pytest.mark.parametrize("strategy,home", [("fsdp_offload", "cpu"), ("fsdp", "cuda")])
def test_fsdp_offload_keeps_parameter_shards_on_cpu(info, tmp_path, strategy, home):
    model, engine = build(info, tmp_path, f"strategy={strategy}")
    step_backward(engine, [batch(info.device)], info.device)[0]
    engine.step()
    assert {_local(p).device.type for p in model.parameters()} == {home}
    states = [s["exp_avg"] for s in engine.optim.optimizer.state.values()]
    assert states and {_local(t).device.type for t in states} == {home}


@pytest.mark.parametrize("strategy,home", [("zero3_offload", "cpu"), ("zero3", "cuda")])
def test_zero3_offload_keeps_optimizer_state_on_cpu(info, tmp_path, strategy, home):
    _, engine = build(info, tmp_path, f"strategy={strategy}")
    step_backward(engine, [batch(info.device)], info.device)[0]
    engine.step()
    opt = engine.engine.optimizer
    states = [opt.optimizer.state[t] for t in opt.fp32_partitioned_groups_flat]
    assert states and {s["exp_avg"].device.type for s in states} == {home}
    assert {p.ds_tensor.device.type for p in engine.engine.module.parameters()} == {home}


def _probe(strategy: str, *overrides: str) -> dict:
    import subprocess

    from tests.helpers import PY, REPO, child_env, free_port

    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "support" / "gpu_probe.py"), strategy, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("strategy,compiled", [("fsdp", True), ("ddp", True), ("zero3", False)])
def test_compile_flex_bf16_nccl_really_on(strategy, compiled):
    """Not just that it ran: the group is nccl, the blocks compute in bf16 inside compiled modules
    (ZeRO-3 cannot be compiled: a config error), and attention went through FlexAttention with the
    chunked loss."""
    pytest.importorskip("triton", reason="FlexAttention and torch.compile on CUDA need triton")
    out = _probe(strategy, f"trainer.compile={str(compiled).lower()}", "model.attention=flex", "trainer.loss=chunked")
    assert out["backend"] == "nccl" and out["device"].startswith("cuda")
    assert out["attn_out_dtype"] == "torch.bfloat16"
    # torch.compile's wrapper around each block; fully_shard then swaps in its own subclass of it
    assert (out["block_type"] in COMPILED_BLOCKS) == compiled, out["block_type"]
    assert out["attn_implementation"] == out["attention_kernel_called"] == "flex_attention"
    assert out["loss"] == out["loss"]  # not NaN


def test_flash_attention_really_on():
    pytest.importorskip("flash_attn", reason="model.attention=flash needs the flash-attn package")
    out = _probe("fsdp", "model.attention=flash")
    assert out["attention_kernel_called"] == "flash_attention_2" and out["attn_out_dtype"] == "torch.bfloat16"
