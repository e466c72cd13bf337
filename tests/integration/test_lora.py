"""LoRA on model=hf_local under every strategy: parity, a frozen base, exact resume, exports that
peft itself agrees with, and a refused base swap."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, child_env, losses, run_train, save_tiny_llama

STEPS = 8
# Global batch 4: 2 ranks x micro 2, or 1 rank x micro 2 x accumulation 2; checkpoints at 4 and 8.
COMMON = ("adapter=lora", "model=hf_local", "trainer.max_steps=8", "trainer.global_batch_size=4",
          "trainer.micro_batch_size=2", "optim.lr=1e-2", "schedule.warmup_steps=2", "checkpoint.every_steps=4")
EXPORT = ("export=hf", "export.dtype=fp32", "export.verify_new_tokens=0", "export.on_error=raise")  # export.adapter: null = both
LAST = "step_00000008"


def args(base: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, *COMMON, f"model.path={base}", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def runs(hf_base, tmp_path_factory):
    """LoRA runs computed once on demand: (strategy, nproc, extra) -> run directory."""
    root, cache = tmp_path_factory.mktemp("lora"), {}

    def get(strategy: str, nproc: int, extra: tuple[str, ...] = ()) -> Path:
        key = (strategy, nproc, extra)
        if key not in cache:
            run_dir = root / f"{strategy}-{nproc}-{len(cache)}"
            run_train(args(hf_base, run_dir, f"strategy={strategy}", *extra), nproc=nproc, timeout=900)
            cache[key] = run_dir
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """1 rank, accumulation 2, exported at the end (merged model and PEFT adapter)."""
    return runs("ddp", 1, EXPORT)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_match_one_rank(strategy, runs, reference):
    extra = EXPORT if strategy == "zero3" else ()  # a sharded engine's adapter checkpoint exports too
    curve, ref = losses(runs(strategy, 2, extra)), losses(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    for step, loss in ref.items():
        assert curve[step] == pytest.approx(loss, rel=1e-4), (strategy, step, curve, ref)


@pytest.mark.slow
def test_checkpoint_holds_only_the_adapter_and_names_its_base(reference, hf_base):
    from train.export.dcp_reader import DCPWeights

    ckpt = reference / "checkpoints" / LAST
    names = DCPWeights(ckpt / "model").names()
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    base_bytes = (hf_base / "model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in (ckpt / "model").iterdir()) < base_bytes
    state = json.loads((ckpt / "trainer_state.json").read_text())["adapter"]
    assert state["base_model"] == str(hf_base.absolute()) and state["base_fingerprint"].startswith("files:")
    assert state["lora_config"]["r"] == 16 and len(state["lora_config"]["target_modules"]) == 7


@pytest.mark.slow
def test_base_stays_bit_identical_and_the_adapter_trains(hf_base):
    """The live model after real training steps (DDP strategy, one process, no group needed)."""
    from safetensors.torch import load_file

    from data_pipeline import build_loader
    from train import dist as d
    from train.adapters.config import AdapterConfig
    from train.adapters.lora import apply_adapter
    from train.config import Config, ModelConfig, TrainerConfig
    from train.model import build_model
    from train.step import forward_backward, next_micro_batches, optimizer_step
    from train.strategies import build_strategy

    cfg = Config(model=ModelConfig(kind="hf_local", path=str(hf_base)), adapter=AdapterConfig(kind="lora"),
                 trainer=TrainerConfig(seq_len=32, micro_batch_size=2, max_steps=10))
    cfg.optim.lr = 1e-2
    info = d.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = apply_adapter(build_model(cfg.model, 256, 0), cfg.adapter)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    strategy = build_strategy(model, cfg, info, 1)
    batches = iter(build_loader(cfg.data, rank=0, world_size=1, micro_batch_size=2, seq_len=32))
    for _ in range(3):
        forward_backward(strategy, next_micro_batches(batches, 1, info.device)[0], info.device)
        optimizer_step(strategy)
    saved = load_file(hf_base / "model.safetensors")
    base = model.get_base_model().state_dict()
    frozen = {n.replace(".base_layer", ""): t for n, t in base.items() if "lora_" not in n}
    assert saved.keys() <= frozen.keys()
    for name, tensor in saved.items():
        assert torch.equal(frozen[name], tensor), name
    trained = dict(model.named_parameters())
    assert lora_before and all(not torch.equal(trained[n], t) for n, t in lora_before.items() if ".lora_B." in n)


@pytest.mark.slow
def test_merged_export_equals_peft_merge_and_unload(reference, hf_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.export.dcp_reader import DCPWeights

    ckpt = reference / "checkpoints" / LAST
    lora = json.loads((ckpt / "trainer_state.json").read_text())["adapter"]["lora_config"]
    weights = DCPWeights(ckpt / "model")
    base = AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**lora))
    result = peft_model.load_state_dict({n: weights.load(n) for n in weights.names()}, strict=False)
    assert not result.unexpected_keys
    assert any(weights.load(n).abs().max() > 0 for n in weights.names() if ".lora_B." in n)
    merged = peft_model.merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(reference / "exports" / LAST, local_files_only=True,
                                                    dtype=torch.float32).state_dict()
    assert exported.keys() == merged.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
def test_adapter_export_loads_with_peft_and_matches_the_merged_export(reference, hf_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export = reference / "exports" / LAST
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, export / "adapter", local_files_only=True).eval()
    merged = AutoModelForCausalLM.from_pretrained(export, local_files_only=True, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want, before = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - before).abs().max() > 1e-3  # the adapter changed the model: the check can fail


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_adapter_export_matches_the_single_rank_one(runs, reference):
    from safetensors.torch import load_file

    zero3 = load_file(runs("zero3", 2, EXPORT) / "exports" / LAST / "adapter" / "adapter_model.safetensors")
    ref = load_file(reference / "exports" / LAST / "adapter" / "adapter_model.safetensors")
    assert zero3.keys() == ref.keys()
    for name, tensor in ref.items():
        torch.testing.assert_close(zero3[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_after_a_checkpoint_then_the_same_command(hf_base, reference, tmp_path):
    """Killed once step 8's shards are written (step 4 is published): the rerun replays 5-8 exactly."""
    cmd = args(hf_base, tmp_path, "strategy=ddp", *EXPORT)
    killed = run_train(cmd, check=False, env=child_env(SCALETRAIN_FAULT=f"checkpoint.publish@{STEPS}"))
    assert killed.returncode != 0 and (tmp_path / "checkpoints" / "step_00000004").is_dir()
    assert not (tmp_path / "checkpoints" / LAST).exists()
    run_train(cmd)
    assert losses(tmp_path) == losses(reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])  # DCP resharding; DeepSpeed's universal checkpoint
def test_adapter_checkpoint_of_two_ranks_resumes_on_one(strategy, runs, reference, hf_base, tmp_path):
    source = runs(strategy, 2)
    shutil.copytree(source / "checkpoints" / "step_00000004", tmp_path / "checkpoints" / "step_00000004")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    run_train(args(hf_base, tmp_path, f"strategy={strategy}"))
    resumed, ref = losses(tmp_path), losses(reference)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=1e-4), (step, resumed, ref)


@pytest.mark.slow
def test_resuming_on_another_base_is_refused(reference, hf_base, tmp_path):
    other = save_tiny_llama(tmp_path / "other_base", seed=8)
    shutil.copytree(reference / "checkpoints", tmp_path / "run" / "checkpoints")
    proc = run_train(args(other, tmp_path / "run", "trainer.max_steps=9"), check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and str(hf_base.absolute()) in proc.stderr and str(other) in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_qlora_without_cuda_is_refused_before_start(hf_base, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_train([*TINY, "adapter=qlora", "model=hf_local", f"model.path={hf_base}", "strategy=zero3",
                      f"run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "adapter=qlora needs a CUDA GPU" in proc.stderr and "strategy=ddp or strategy=fsdp" in proc.stderr
    assert not tmp_path.joinpath("metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_qlora_on_one_gpu(strategy, hf_base, tmp_path):
    """4-bit NF4 base (bitsandbytes) + LoRA, bf16: trains, checkpoints only the adapter, exports it."""
    pytest.importorskip("bitsandbytes")
    run_train([*TINY, "adapter=qlora", "model=hf_local", f"model.path={hf_base}", f"strategy={strategy}",
               "trainer.max_steps=10", "trainer.micro_batch_size=2", "optim.lr=1e-2", *EXPORT,
               "export.adapter=adapter", f"run.dir={tmp_path}"])
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 11)) and all(v == v for v in curve.values())  # finite, not NaN
    state = json.loads((tmp_path / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["adapter"]["kind"] == "qlora"
    assert (tmp_path / "exports" / "step_00000010" / "adapter" / "adapter_model.safetensors").is_file()
