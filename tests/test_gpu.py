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
