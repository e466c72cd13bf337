"""GPU paths (nccl, bf16, ddp/fsdp/zero3 on one GPU): run where a GPU is lent, skipped elsewhere."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY, losses, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_one_gpu_bf16_nccl(strategy, tmp_path):
    run_train([*TINY, f"strategy={strategy}", "trainer.max_steps=10", "trainer.global_batch_size=4",
               "trainer.micro_batch_size=2", f"run.dir={tmp_path}"], nproc=1)
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 11)) and curve[10] < curve[1]
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line][-1]
    assert last["mem_peak_gb"] > 0


def _probe(strategy: str, *overrides: str) -> dict:
    import subprocess

    from tests.helpers import PY, REPO, child_env, free_port

    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "gpu_probe.py"), strategy, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("strategy,compiled", [("fsdp", True), ("ddp", True), ("zero3", False)])
def test_compile_flex_bf16_nccl_really_on(strategy, compiled):
    """Not just that it ran: the group is nccl, the blocks compute in bf16 inside compiled modules
    (ZeRO-3 cannot be compiled: a config error), and attention went through FlexAttention with the
    chunked loss."""
    out = _probe(strategy, f"trainer.compile={str(compiled).lower()}", "model.attention=flex", "trainer.loss=chunked")
    assert out["backend"] == "nccl" and out["device"].startswith("cuda")
    assert out["attn_out_dtype"] == "torch.bfloat16"
    assert (out["block_type"] == "OptimizedModule") == compiled  # torch.compile's wrapper around each block
    assert out["attn_implementation"] == out["attention_kernel_called"] == "flex_attention"
    assert out["loss"] == out["loss"]  # not NaN


def test_flash_attention_really_on():
    pytest.importorskip("flash_attn")
    out = _probe("fsdp", "model.attention=flash")
    assert out["attention_kernel_called"] == "flash_attention_2" and out["attn_out_dtype"] == "torch.bfloat16"
