"""Hugging Face export on checkpoints in the trainer's layout: weights, dtypes, sharding,
tokenizer, verification, export.json, retention, user hooks, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.fsutil import file_sha256
from tests.helpers.export_checkpoints import (
    TINY_LLAMA,
    export_tensors,
    logits,
    make_checkpoint,
    make_tokenizer,
)
from train.export.config import ExportConfig
from train.export.files import verify_dir
from train.export.hf_export import export_checkpoint
from train.export.verify import ExportVerificationError, verify_batch


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"))


def hf(**kw) -> ExportConfig:
    return ExportConfig(kind="hf", **{"dtype": "fp32", **kw})  # exact comparisons; bf16 is tested by name


def test_fp32_export_equals_checkpoint_and_loads_offline(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    meta = export_checkpoint(ckpt.path, out, hf(max_shard_size="40KB"))
    tensors = export_tensors(out)
    assert set(tensors) == set(ckpt.state_dict) - {"model.rotary_emb.inv_freq"}
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and torch.equal(t, ckpt.state_dict[name]), name
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2, "max_shard_size=40KB must split the ~240KB model"
    for shard in shards:  # within the limit, or one tensor bigger than the limit on its own
        names = [n for n, f in weight_map.items() if f == shard]
        data = sum(tensors[n].numel() * 4 for n in names)
        assert data <= 40_000 or len(names) == 1, (shard, names, data)

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = verify_batch(TINY_LLAMA["vocab_size"])
    assert torch.equal(logits(model, ids), logits(ckpt.model, ids))
    assert model.config.use_cache is True
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= set(meta["files"])

    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["step"] == 2 and on_disk["tokens"] == 256 and on_disk["dtype"] == "fp32"
    assert on_disk["strategy"]["name"] == "ddp" and on_disk["config_digest"] == "0123456789abcdef"
    assert on_disk["source_checkpoint"] == str(ckpt.path.resolve())
    assert on_disk["tokenizer"] is None and "synthetic" in on_disk["tokenizer_note"]
    for rel, info in on_disk["files"].items():
        assert file_sha256(out / rel) == info["sha256"], rel
    v = on_disk["verification"]
    assert v["passed"] and v["max_abs_diff"] == 0.0 and v["reference"] == "checkpoint fp32 weights"
    assert len(v["generated_ids"]) == 8
    assert "step 2" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_export_rounds_the_fp32_weights(ckpt, tmp_path, dtype, torch_dtype):
    out = tmp_path / dtype
    meta = export_checkpoint(ckpt.path, out, hf(dtype=dtype))
    for name, t in export_tensors(out).items():
        assert t.dtype == torch_dtype and torch.equal(t, ckpt.state_dict[name].to(torch_dtype)), name
    v = meta["verification"]
    assert v["passed"] and v["loaded_dtype"] == str(torch_dtype).split(".")[1]
    assert 0 < v["relative_diff"] <= v["tolerance"]
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).split(".")[1]


def test_tied_embeddings_are_written_once_and_tied_on_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tied = make_checkpoint(tmp_path / "run", config=LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True))
    out = tmp_path / "export"
    export_checkpoint(tied.path, out, hf())
    assert "lm_head.weight" not in export_tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = verify_batch(TINY_LLAMA["vocab_size"])
    assert torch.equal(logits(model, ids), logits(tied.model, ids))


def test_tokenizer_from_trainer_state_is_exported(tmp_path):
    from transformers import AutoTokenizer

    tok_dir = make_tokenizer(tmp_path / "data" / "tokenizer")
    ck = make_checkpoint(tmp_path / "run", tokenizer_dir=str(tok_dir))
    out = tmp_path / "export"
    meta = export_checkpoint(ck.path, out, hf())
    source, exported = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(out)
    text = "the quick export of a lazy fox"
    assert exported(text)["input_ids"] == source(text)["input_ids"]
    assert exported.eos_token == "<|endoftext|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == source.eos_token_id
    assert meta["tokenizer"]["source"] == str(tok_dir) and "tokenizer.json" in meta["files"]
    assert isinstance(meta["verification"]["generated_text"], str)


def test_failed_verification_publishes_nothing_and_keeps_the_previous_export(ckpt, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(ckpt.path, out, hf())
    before = (out / "export.json").read_text()
    wrong = torch.zeros(2, 16, TINY_LLAMA["vocab_size"]) + 5.0
    with pytest.raises(ExportVerificationError, match="failed verification.*nothing was published"):
        export_checkpoint(ckpt.path, out, hf(), reference_logits=wrong)
    assert (out / "export.json").read_text() == before
    verify_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_live_reference_logits_are_used_and_recorded(ckpt, tmp_path):
    ids = verify_batch(TINY_LLAMA["vocab_size"])
    meta = export_checkpoint(ckpt.path, tmp_path / "e", hf(), reference_logits=logits(ckpt.model, ids))
    assert meta["verification"]["reference"] == "live training model (fp32)"
    assert meta["verification"]["max_abs_diff"] == 0.0


def test_verify_dir_names_tampered_truncated_and_missing_files(ckpt, tmp_path):
    from train.export.__main__ import main
    from train.export.files import ExportVerifyError

    out = tmp_path / "export"
    export_checkpoint(ckpt.path, out, hf(max_shard_size="40KB", verify=False))
    assert main([f"verify={out}"]) == 0
    shard = sorted(out.glob("model-*.safetensors"))
    raw = bytearray(shard[0].read_bytes())
    raw[-3] ^= 0xFF
    shard[0].write_bytes(bytes(raw))
    shard[1].write_bytes(shard[1].read_bytes()[:-100])
    (out / "config.json").unlink()
    with pytest.raises(ExportVerifyError) as err:
        verify_dir(out)
    msg = str(err.value)
    assert f"{shard[0].name}: sha256" in msg and "modified" in msg
    assert f"{shard[1].name}: size" in msg and "truncated" in msg
    assert "config.json: missing" in msg
    assert main([f"verify={out}"]) == 1


def test_export_hook_retention_and_registry_copy(ckpt, tmp_path):
    from train.export.hook import ExportHook

    registry = tmp_path / "registry"
    cfg = hf(keep_last=2, verify=False, every_steps=5,
             hooks=[{"_target_": "train.export.hooks_example.copy_to", "dest": str(registry)},
                    {"_target_": "train.export.hooks_example.log_export", "_partial_": True, "prefix": "t"}])
    hook = ExportHook(cfg, run_dir=tmp_path / "run")
    assert [s for s in range(1, 12) if hook.due(s)] == [5, 10] and hook.due(7, final=True)
    for step in (5, 10, 12):
        meta = hook(step, ckpt.path)
        assert [h["ok"] for h in meta["hooks"]] == [True, True], meta["hooks"]
    assert sorted(p.name for p in (tmp_path / "run" / "exports").iterdir()) == ["step_00000010", "step_00000012"]
    assert meta["pruned"] == ["step_00000005"]
    assert sorted(p.name for p in registry.iterdir()) == ["step_00000005", "step_00000010", "step_00000012"]
    verify_dir(registry / "step_00000012")


def test_export_hook_warns_instead_of_killing_training(tmp_path):
    from train.export.hook import ExportHook

    meta = ExportHook(hf(), run_dir=tmp_path)(3, tmp_path / "no-such-checkpoint")
    assert "does not exist" in meta["error"]
    with pytest.raises(ValueError, match="does not exist"):
        ExportHook(hf(on_error="raise"), run_dir=tmp_path)(3, tmp_path / "no-such-checkpoint")


def test_bad_hook_target_fails_at_startup_with_the_real_import_error():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config({"export": {"kind": "hf", "hooks": [{"_target_": "no_such_pkg.registry.push"},
                                                        {"_target_": "train.export.hooks_example.nope"},
                                                        {"dest": "/x"}]}}, world_size=1)
    msg = str(err.value)
    assert "export.hooks[0]._target_='no_such_pkg.registry.push'" in msg
    assert "ModuleNotFoundError: No module named 'no_such_pkg'" in msg
    assert "export.hooks[1]" in msg and "has no attribute 'nope'" in msg
    assert "export.hooks[2]" in msg and "_target_" in msg


def test_bad_checkpoints_are_refused_clearly(ckpt, tmp_path):
    from train.export.checkpoint_reader import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "o", hf())
    partial = tmp_path / "checkpoints" / ".tmp-step_00000004"
    partial.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        export_checkpoint(partial, tmp_path / "o", hf())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o", hf())
    # a run directory resolves through checkpoints/latest
    meta = export_checkpoint(ckpt.path.parent.parent, tmp_path / "o", hf(verify=False))
    assert meta["step"] == 2


@pytest.mark.parametrize("group", ["hf", "none"])
def test_export_configs_compose_and_validate(group, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import load_config
    from train.export.__main__ import CONF_DIR, export_config
    from train.export.__main__ import compose as compose_cmd

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = OmegaConf.to_container(compose("train", overrides=[f"export={group}", f"run.dir={tmp_path}"]),
                                     resolve=True)
    assert load_config(raw, world_size=1).export.kind == group
    if group == "hf":
        cmd = compose_cmd(["checkpoint=/x", "export.gguf=q8_0", "export.dtype=bf16"])
        cfg = export_config(cmd["export"])
        assert cmd["checkpoint"] == "/x" and (cfg.gguf, cfg.dtype, cfg.verify) == ("q8_0", "bf16", True)
