"""Fine-tuning a local Hugging Face checkpoint (model=hf_local): its weights are the starting point."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.read.config import SyntheticDataConfig
from data_pipeline.read.synthetic import SyntheticLoader
from tests.helpers import TINY, losses, run_train
from tests.helpers.inprocess import train_here


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(out)
    return out, model


@pytest.mark.slow
def test_hf_local_starts_from_the_pretrained_weights(local_checkpoint, tmp_path):
    path, model = local_checkpoint
    train_here([*TINY, "model=hf_local", f"model.path={path}", "data.vocab_size=96", "trainer.max_steps=2",
               "trainer.micro_batch_size=2", "optim.lr=1e-5", f"run.dir={tmp_path}"])
    # The first logged loss is the loss of the saved weights on the first batch.
    batch = next(iter(SyntheticLoader(SyntheticDataConfig(vocab_size=96), rank=0, world_size=1,
                                      micro_batch_size=2, seq_len=32)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    expected = F.cross_entropy(logits.view(-1, 96), batch["labels"].view(-1)).item()
    assert losses(tmp_path)[1] == pytest.approx(expected, rel=1e-5)
    state = json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["model_config"]["hidden_size"] == 32


def test_data_vocabulary_larger_than_the_model_is_refused(local_checkpoint, tmp_path):
    path, _ = local_checkpoint
    proc = run_train([*TINY, "model=hf_local", f"model.path={path}", "data.vocab_size=256", "trainer.max_steps=1",
                      f"run.dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    assert "the data has 256 token ids but the model's vocabulary has 96" in proc.stderr
