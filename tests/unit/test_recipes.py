"""`experiment=sft_lora|sft_full` carry the optimizer and schedule defaults of TRL's SFTTrainer
(the oracle: TRL's own SFTConfig), and the `linear`/`cosine` schedules equal transformers' own."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import compose_train
from tests.support.data import make_shards
from train.config import ScheduleConfig, load_config
from train.schedule import lr_lambda


@pytest.mark.parametrize("recipe", ["sft_lora", "sft_full"])
def test_sft_recipes_use_trl_defaults(recipe, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "hf")
    cfg = load_config(compose_train([f"experiment={recipe}", f"model.path={tmp_path / 'hf'}",
                                     f"data.urls={make_shards(tmp_path).root}", f"run.dir={tmp_path}/run"]), 1)
    trl = SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False)  # its bf16 default needs a GPU
    assert cfg.optim.betas == [trl.adam_beta1, trl.adam_beta2] and cfg.optim.eps == trl.adam_epsilon
    assert cfg.optim.weight_decay == trl.weight_decay and cfg.trainer.grad_clip == trl.max_grad_norm
    assert cfg.trainer.epochs == trl.num_train_epochs and cfg.trainer.max_steps is None
    assert cfg.data.pack and cfg.trainer.dtype == "auto" and cfg.schedule.warmup_ratio > 0
    assert (cfg.adapter.kind == "lora") == (recipe == "sft_lora") and cfg.model.kind == "hf_local"
    if recipe == "sft_full":
        assert cfg.optim.lr == trl.learning_rate


@pytest.mark.parametrize("kind,hf", [("linear", "get_linear_schedule_with_warmup"),
                                     ("cosine", "get_cosine_schedule_with_warmup")])
def test_schedules_equal_transformers_after_warmup(kind, hf):
    import transformers

    steps, warmup = 50, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = getattr(transformers, hf)(opt, num_warmup_steps=warmup, num_training_steps=steps).lr_lambdas[0]
    ours = lr_lambda(ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=0.0), steps)
    # in warmup ours is one step ahead ((s+1)/w: never a step at LR 0); after it they agree
    assert [ours(s) for s in range(warmup, steps + 1)] == pytest.approx([ref(s) for s in range(warmup, steps + 1)])
    ratio = lr_lambda(ScheduleConfig(kind=kind, warmup_ratio=0.1, min_lr_ratio=0.0), steps)
    assert [ratio(s) for s in range(steps)] == [ours(s) for s in range(steps)]  # 0.1 x 50 = 5 steps
