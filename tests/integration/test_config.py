"""Every config in conf/ composes and validates; bad input fails early, clearly, destroying nothing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO, compose_train, run_train
from tests.support.data import make_shards
from train.config import ConfigError, load_config

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


# Settings a group option needs from the user (paths on their machine) before it can validate.
REQUIRED = {("model", "hf_local"): "model.path={tiny_hf}", ("data", "webdataset"): "data.urls={shards}",
            ("experiment", "demo"): "data.urls={shards}",
            ("data", "mix"): "data.mix=[{{urls: '{shards}', weight: 0.7}}, {{urls: '{shards}', weight: 0.3, name: b}}]",
            ("experiment", "sft_lora"): ("model.path={tiny_hf}", "data.urls={shards}"),
            ("experiment", "sft_full"): ("model.path={tiny_hf}", "data.urls={shards}"),
            ("objective", "dpo"): ("data=webdataset", "data.urls={shards}")}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(out)
    return out


@pytest.mark.parametrize("group,option", group_options())
def test_every_group_option_composes_and_validates(group, option, tiny_hf, tmp_path):
    overrides = [f"{group}={option}", f"run.dir={tmp_path}/run"]
    if (group, option) in REQUIRED:
        needs = REQUIRED[(group, option)]
        shards = make_shards(tmp_path).root
        overrides += [n.format(tiny_hf=tiny_hf, shards=shards) for n in ((needs,) if isinstance(needs, str) else needs)]
    if (group, option) == ("adapter", "qlora"):  # a 4-bit NF4 base: CUDA and bitsandbytes only
        overrides += ["model=hf_local", f"model.path={tiny_hf}"]
        import torch

        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="adapter=qlora needs a CUDA GPU"):
                load_config(compose_train(overrides), world_size=2)
            return
        if importlib.util.find_spec("bitsandbytes") is None:  # a GPU without the optional package
            with pytest.raises(ConfigError, match="adapter=qlora needs the bitsandbytes package"):
                load_config(compose_train(overrides), world_size=2)
            pytest.skip("bitsandbytes is not installed: the qlora config is refused with its install command")
    cfg = load_config(compose_train(overrides), world_size=2)
    if group == "experiment":
        assert cfg.run.name == option
    elif (group, option) == ("data", "mix"):
        assert [s.weight for s in cfg.data.mix] == [0.7, 0.3] and cfg.data.urls == ""
    else:  # the option chosen is the one that was built
        section = getattr(cfg, group)
        assert option in (getattr(section, "name", None), getattr(section, "kind", None)), section


def test_every_problem_is_reported_at_once(tmp_path):
    raw = compose_train([f"run.dir={tmp_path}", "+trainer.bogus=1", "trainer.dtype=fp8", "optim.lr=fast"])
    with pytest.raises(ConfigError) as err:
        load_config(raw, world_size=2)
    problems = err.value.problems
    assert any(p.startswith("trainer.bogus: unknown key") for p in problems), problems
    assert any(p.startswith("optim.lr='fast'") for p in problems), problems


def test_cross_field_errors_name_key_and_fix(tmp_path):
    raw = compose_train([f"run.dir={tmp_path}", "trainer.global_batch_size=6", "trainer.micro_batch_size=4",
                         "trainer.dtype=fp8", "model=hf_local", "model.path=/nonexistent"])
    with pytest.raises(ConfigError) as err:
        load_config(raw, world_size=2)
    problems = err.value.problems
    assert any("trainer.global_batch_size=6" in p and "multiple of 8" in p for p in problems), problems
    assert any("trainer.dtype='fp8'" in p and "auto, fp32 or bf16" in p for p in problems), problems
    assert any("model.path='/nonexistent'" in p for p in problems), problems


def test_missing_shards_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; run `python -m data_pipeline.prepare"):
        load_config(compose_train([f"run.dir={tmp_path}", "data=webdataset", f"data.urls={tmp_path}/nope"]),
                    world_size=1)


def test_hf_local_without_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(compose_train([f"run.dir={tmp_path}", "model=hf_local", "model.path=null"]), world_size=1)


def test_trust_remote_code_is_off_by_default(tiny_hf, tmp_path):
    cfg = load_config(compose_train([f"run.dir={tmp_path}", "model=hf_local", f"model.path={tiny_hf}"]),
                      world_size=1)
    assert cfg.model.trust_remote_code is False


def test_cli_unknown_strategy_fails_before_training(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = run_train([f"run.dir={tmp_path}", "strategy=nope"], check=False)
    assert proc.returncode != 0
    assert "strategy" in proc.stderr and "nope" in proc.stderr
    assert "ddp" in proc.stderr  # Hydra lists the available options
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_cli_unknown_model_fails_before_training(tmp_path):
    proc = run_train([f"run.dir={tmp_path}/run", "model=gpt17"], check=False)
    assert proc.returncode != 0 and "model" in proc.stderr and "gpt17" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_bad_batch_and_unusable_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    # A run dir below a file cannot be created, even by root (chmod tricks don't stop root).
    proc = run_train([f"run.dir={run_dir}/metrics.jsonl/sub", "trainer.global_batch_size=3",
                      "trainer.micro_batch_size=2"], check=False)
    assert proc.returncode == 2
    assert "trainer.global_batch_size=3" in proc.stderr and "multiple of 2" in proc.stderr
    assert "is a file, not a directory" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root can write into read-only directories")
def test_cli_read_only_run_dir(tmp_path):
    tmp_path.chmod(0o500)
    try:
        proc = run_train([f"run.dir={tmp_path}/run"], check=False)
    finally:
        tmp_path.chmod(0o700)
    assert proc.returncode == 2 and "not writable" in proc.stderr
