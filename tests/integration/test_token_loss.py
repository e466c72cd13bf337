"""The loss is the mean over every trained token of the global batch, however it is split
(micro-batches, accumulation, ranks): transformers' num_items_in_batch fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import PY, REPO, child_env, free_port
from tests.helpers.token_weight_worker import SEQ, TRAINED, global_batch

LAYOUTS_ONE_RANK = ["ddp:4:1", "ddp:1:4", "deepspeed:1:4"]  # strategy:micro:accum
LAYOUTS_TWO_RANKS = ["ddp:2:1", "deepspeed:2:1"]


def _worker(base, out, layouts, nproc):
    import subprocess

    launcher = [PY, "-m", "tests.helpers.token_weight_worker"] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "tests.helpers.token_weight_worker"]
    proc = subprocess.run([*launcher, str(base), str(out), *layouts], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def results(hf_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token_loss")
    one = _worker(hf_base, tmp / "one.pt", LAYOUTS_ONE_RANK, 1)
    two = _worker(hf_base, tmp / "two.pt", LAYOUTS_TWO_RANKS, 2)
    return {**one, **two}


@pytest.fixture(scope="module")
def oracle(hf_base):
    """One forward over the whole global batch, mean cross-entropy over its trained tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True, dtype=torch.float32)
    batch = global_batch()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    per_row = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), ignore_index=-100,
                              reduction="none").view(len(TRAINED), SEQ).sum(1) / torch.tensor(TRAINED)
    return {"loss": loss.item(), "grads": grads, "grad_norm": norm, "row_mean": per_row.mean().item()}


def test_the_batch_is_unequal_enough_to_tell(oracle):
    """Twin: averaging per-row (per-micro-batch) means would give another loss, so the checks
    below can fail."""
    assert abs(oracle["row_mean"] - oracle["loss"]) > 1e-3 * oracle["loss"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS_ONE_RANK + LAYOUTS_TWO_RANKS)
def test_same_loss_and_gradients_in_every_layout(layout, results, oracle):
    got = results[layout]
    assert got["num_tokens"] == sum(TRAINED)
    assert got["loss"] == pytest.approx(oracle["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(oracle["grad_norm"], rel=1e-4)
    if "grads" in got:  # DDP keeps full gradients on every rank; ZeRO partitions them
        for name, grad in oracle["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
