"""LoRA exports against peft itself: the PEFT directory loads with PeftModel.from_pretrained and gives
the trained model's logits; the streamed merge equals peft's merge_and_unload() tensor for tensor."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from train.export.peft_export import (
    AdapterExportError,
    LoraMergedWeights,
    SafetensorsWeights,
    write_peft_adapter,
)
from train.export.verify import NonFiniteWeightsError

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LORA = dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"],
            rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4}, modules_to_save=["lm_head"],
            lora_dropout=0.0, init_lora_weights=False)  # random B: a zero delta would hide a wrong merge


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base model directory and a real peft LoRA model over it with non-trivial adapter weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    base_dir = tmp_path_factory.mktemp("peft") / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    return base_dir, peft_model


def trainable_state(peft_model, prefix=""):
    """Adapter parameters as a training checkpoint holds them (peft parameter names, DDP's module.)."""
    return {prefix + n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.arange(2 * 12).reshape(2, 12) % TINY["vocab_size"]


@pytest.mark.parametrize("form", ["named+ddp", "saved"])
def test_peft_directory_loads_with_peft_and_reproduces_logits(trained, tmp_path, form):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base_dir, peft_model = trained
    state = (trainable_state(peft_model, "module.") if form == "named+ddp"
             else get_peft_model_state_dict(peft_model))
    info = write_peft_adapter(tmp_path / "adapter", base_dir, state, LORA)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == str(base_dir)
    assert info["r"] == 4 and saved["rank_pattern"] == {"down_proj": 2}

    plain = logits(AutoModelForCausalLM.from_pretrained(base_dir), IDS)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded, IDS), logits(peft_model, IDS))
    assert not torch.allclose(plain, logits(loaded, IDS), atol=1e-3)  # the adapter is really applied


def test_streamed_merge_equals_peft_merge_and_unload(trained):
    from transformers import AutoConfig

    base_dir, peft_model = trained
    merged = LoraMergedWeights(SafetensorsWeights(base_dir), AutoConfig.from_pretrained(base_dir),
                               trainable_state(peft_model, "module."), LORA)
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    base = SafetensorsWeights(base_dir)
    changed = 0
    for name in merged.names():
        got = merged.load(name)
        assert torch.allclose(got, reference[name], rtol=0, atol=1e-6), name
        changed += not torch.equal(base.load(name), reference[name])
    assert changed == 2 * 7 + 1  # every adapted projection of both layers, and lm_head


def test_adapter_state_that_does_not_fit_the_config_is_named(trained, tmp_path):
    base_dir, peft_model = trained
    state = trainable_state(peft_model)
    dropped = next(k for k in state if "lora_A" in k)
    del state[dropped]
    with pytest.raises(AdapterExportError, match="missing.*lora_A"):
        write_peft_adapter(tmp_path / "a", base_dir, state, LORA)
    state = trainable_state(peft_model)
    state[dropped] = torch.full_like(state[dropped], float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="NaN"):
        write_peft_adapter(tmp_path / "b", base_dir, state, LORA)
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()


def adapter_checkpoint(root, base_dir, peft_model, step=3):
    """RUN/checkpoints/step_N as an adapter run saves it: only the trainable (adapter) tensors, under
    DDP's names, in DCP; trainer_state.json names the base model and the LoRA config."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig

    ckpt = root / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(trainable_state(peft_model, "module."), checkpoint_id=str(ckpt / "model"), no_dist=True)
    state = {"step": step, "model_config": AutoConfig.from_pretrained(base_dir).to_dict(), "tokenizer_dir": None,
             "adapter": {"kind": "lora", "base_model": str(base_dir), "lora_config": LORA}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state, default=str))
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def test_adapter_checkpoint_exports_merged_and_peft_that_agree(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers.export_checkpoints import export_tensors
    from train.export.config import ExportConfig
    from train.export.hf_export import export_checkpoint

    base_dir, peft_model = trained
    ckpt = adapter_checkpoint(tmp_path / "run", base_dir, peft_model)
    out = tmp_path / "both"
    meta = export_checkpoint(ckpt, out, ExportConfig(kind="hf", dtype="fp32", verify_new_tokens=0))
    assert meta["verification"]["passed"] and meta["verification"]["reference"].startswith("peft model")
    assert meta["adapter"]["dir"] == "adapter"
    assert "adapter/adapter_model.safetensors" in meta["files"]
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for name, tensor in export_tensors(out).items():
        assert torch.allclose(tensor, reference[name], rtol=0, atol=1e-6), name
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    assert torch.allclose(logits(merged, IDS), logits(adapted, IDS), rtol=1e-5, atol=1e-4)  # fp32 sums reordered

    only = tmp_path / "only"
    meta = export_checkpoint(ckpt, only, ExportConfig(kind="hf", adapter="adapter"))
    assert not meta["merged_model"] and meta["verification"] is None
    assert sorted(p.name for p in only.iterdir()) == ["README.md", "adapter", "export.json"]


def test_cli_accepts_export_adapter_and_refuses_it_for_a_full_checkpoint(trained, tmp_path, capsys):
    from tests.helpers.export_checkpoints import make_checkpoint
    from train.export.__main__ import main

    base_dir, peft_model = trained
    ckpt = adapter_checkpoint(tmp_path / "run", base_dir, peft_model)
    assert main([f"checkpoint={ckpt}", f"out={tmp_path / 'e'}", "export.adapter=merged", "export.verify=false"]) == 0
    assert (tmp_path / "e" / "model.safetensors.index.json").is_file() and not (tmp_path / "e" / "adapter").exists()
    full = make_checkpoint(tmp_path / "full")
    assert main([f"checkpoint={full.path}", f"out={tmp_path / 'f'}", "export.adapter=both"]) == 2
    assert "export.adapter=both" in capsys.readouterr().err and not (tmp_path / "f").exists()
