"""`python -m launch plan`: the ZeRO paper's figures, transformers' parameter counts, the CLI, and the
planner's model-state bytes against the bytes each strategy really allocates on 2 gloo ranks."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch.gpus import lookup
from launch.plan import Adapter, Setup, Shape, model_state
from launch.state import state_bytes
from tests.helpers import PY, REPO, child_env, free_port
from train.adapters.config import ALL_LINEAR

GB = 1e9


@pytest.mark.parametrize("strategy,paper_gb", [("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)])
def test_zero_paper_figure_1(strategy, paper_gb):
    """ZeRO paper, Figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam (K = 12)."""
    state = model_state(7_500_000_000, strategy, 64, bf16=True)
    assert sum(state.values()) / GB == pytest.approx(paper_gb, abs=0.05)


def test_baseline_is_16_bytes_per_parameter():
    assert sum(model_state(7_500_000_000, "ddp", 64, bf16=True).values()) / GB == pytest.approx(120)
    assert sum(model_state(7_500_000_000, "fsdp", 64, bf16=True).values()) / GB == pytest.approx(120 / 64)


@pytest.mark.parametrize("model", ["llama3_1b", "llama3_8b"])
def test_parameter_count_matches_transformers(model):
    import yaml

    c = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    shape = Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                  c["num_attention_heads"], c["num_key_value_heads"], c["tie_word_embeddings"])
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"], tie_word_embeddings=c["tie_word_embeddings"]))
    assert shape.params == sum(p.numel() for p in hf.parameters())


def _plan(*overrides: str) -> subprocess.CompletedProcess:
    """The CLI in a child that reports whether torch was imported (it must not be)."""
    code = ("import atexit, sys, runpy; atexit.register(lambda: print('TORCH', 'torch' in sys.modules, "
            "file=sys.stderr)); sys.argv = ['launch', 'plan', *sys.argv[1:]]; "
            "runpy.run_module('launch', run_name='__main__')")
    return subprocess.run([PY, "-c", code, *overrides], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)


def test_cli_json_and_no_torch():
    # two nodes and no launch.rdzv_endpoint: a launch needs one, an estimate does not
    proc = _plan("model=llama3_8b", "strategy=zero3", "launch.nnodes=2", "launch.gpus_per_node=8",
                 "run.dir=/tmp/node-local", "trainer.micro_batch_size=2", "trainer.seq_len=8192", "format=json")
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 16 and out["params"] == 8_030_261_248
    assert set(out["per_gpu_bytes"]) == {"params", "grads", "optimizer", "activations", "logits", "buffers", "total"}
    assert out["per_gpu_bytes"]["optimizer"] == 12 * out["params"] // 16
    assert out["gpu_bytes"] == lookup("h100_80gb").memory_bytes and out["fits"] is False
    alts = out["alternatives"]
    assert alts and all(a["total_bytes"] <= out["gpu_bytes"] for a in alts)
    assert [a["est_step_s"] for a in alts] == sorted(a["est_step_s"] for a in alts)
    acts = out["activations_bytes"]
    assert acts["with_checkpointing"] < acts["without_checkpointing"] / 5
    host = out["host_bytes_per_node"]
    assert host["ranks_per_node"] == 8 and out["trainable_params"] == out["params"] and out["adapter"] is None
    for phase in ("startup", "training"):
        parts = {k: v for k, v in host[phase].items() if k != "total"}
        assert host[phase]["total"] == sum(parts.values()) == 8 * host["per_rank"][phase]
    # ZeRO-3 reads a sixteenth of the bf16 files per rank, plus the embedding in flight
    weights = host["startup"]["weights"] / 8
    assert 2 * out["params"] / 16 < weights < 1.2 * 2 * out["params"] / 16 + 2 * 128256 * 4096 + 1


def test_cli_table_and_gpu_choice():
    small = _plan("model=llama3_1b", "launch.gpus_per_node=1", "launch.gpu=h200", "trainer.seq_len=4096")
    assert small.returncode == 0, small.stderr
    assert "fits" in small.stdout and "DOES NOT FIT" not in small.stdout and "h200_141gb" in small.stdout
    bad = _plan("launch.gpu=tpu9")
    assert bad.returncode == 2 and "launch.gpu='tpu9': unknown GPU type" in bad.stderr


def test_lora_plan_counts_only_trainable_state():
    """The issue's case: full Adam state for 8B on one GPU does not fit, LoRA's does."""
    proc = _plan("model=llama3_8b", "strategy=ddp", "adapter=lora", "launch.gpus_per_node=1")
    assert proc.returncode == 0, proc.stderr
    assert "DOES NOT FIT" not in proc.stdout and "fits" in proc.stdout, proc.stdout
    assert "adapter lora r=16: 41.9M trainable of 8.03B" in proc.stdout
    assert "host memory per node (1 rank):" in proc.stdout


def _request(*overrides: str) -> dict:
    from launch.config import load_launch
    from launch.plan import plan_request
    from tests.helpers import compose_train

    raw = compose_train(list(overrides))
    raw.update(target="local", dry_run=False, launch=dict(raw.get("launch") or {}, gpus_per_node=8))
    req = load_launch(raw, planning=True)
    return plan_request(req.train, req.launch)


def test_70b_lora_fits_one_node():
    """Issue 17's goal: Llama-3-70B LoRA on one 8 x 80 GB node, under 256 GB of host RAM; full
    fine-tuning does not fit the GPUs, and offloading it needs over a terabyte of host RAM."""
    lora = _request("model=llama3_70b", "strategy=fsdp", "adapter=lora", "trainer.seq_len=4096",
                    "trainer.micro_batch_size=1", "trainer.activation_checkpointing=true")
    assert lora["fits"] and lora["host_bytes_per_node"]["peak"] < 256 * GB
    assert lora["per_gpu_bytes"]["optimizer"] == 8 * lora["trainable_params"] // 8
    full = _request("model=llama3_70b", "strategy=fsdp", "trainer.seq_len=4096", "trainer.micro_batch_size=1",
                    "trainer.activation_checkpointing=true")
    assert not full["fits"]
    offload = _request("model=llama3_70b", "strategy=fsdp_offload", "trainer.seq_len=4096",
                       "trainer.micro_batch_size=1", "trainer.activation_checkpointing=true")
    assert offload["fits"] and offload["host_bytes_per_node"]["training"]["offloaded"] >= 16 * offload["params"]


@pytest.mark.parametrize("targets,saved", [(["q_proj", "v_proj"], ["lm_head"]), (ALL_LINEAR, [])])
def test_lora_count_matches_peft(targets, saved):
    from peft import LoraConfig, get_peft_model

    shape = Shape(vocab=96, hidden=48, intermediate=80, layers=3, heads=6, kv_heads=2, tied=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2))
    peft_model = get_peft_model(hf, LoraConfig(r=4, target_modules=targets, modules_to_save=saved or None))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert Adapter("lora", 4, tuple(targets), tuple(saved)).trainable(shape) == trainable


def test_launch_warns_before_submitting():
    proc = subprocess.run([PY, "-m", "launch", "dry_run=true", "model=llama3_8b", "strategy=ddp",
                           "launch.gpus_per_node=1", "trainer.seq_len=8192"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the memory plan needs" in proc.stderr and "torchrun" in proc.stdout


def test_model_state_matches_real_allocations():
    """Sum of each engine's real tensors per rank (tests/support/dist_state_bytes.py) vs the planner, fp32 on
    CPU; with LoRA (peft on the tiny model) the planner's trainable count is peft's, and only it has
    gradients and Adam state, while the frozen base is sharded like any parameter."""
    names = ["ddp", "zero1", "zero2", "zero3", "fsdp", "ddp/lora", "zero3/lora", "fsdp/lora"]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "support" / "dist_state_bytes.py"), *names]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = {r["strategy"]: r for r in map(json.loads, (ln for ln in proc.stdout.splitlines() if ln.startswith("{")))}
    assert sorted(rows) == sorted(names)
    for name, row in rows.items():
        strategy, _, kind = name.partition("/")
        c = row["shape"]
        shape = Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                      c["num_attention_heads"], c["num_key_value_heads"], c["tie_word_embeddings"])
        adapter = Adapter(kind, 16, tuple(ALL_LINEAR)) if kind else Adapter()
        setup = Setup(strategy, row["world_size"], 1, 2, 1, 32, False, bf16=False, adapter=adapter,
                      base_dtype=row["base_dtype"], device="cpu")
        psi = adapter.trainable(shape)
        assert psi == row["trainable_count"], (name, psi, row)
        assert shape.params == row["params_count"] - (psi if kind else 0), (name, row)
        planned = state_bytes(shape, setup)
        for key in ("params", "optimizer"):
            assert row[key] == pytest.approx(planned[key], rel=0.05), (name, key, row, planned)
        if strategy in ("zero2", "zero3"):
            # DeepSpeed reduces gradients through a bucket of 5e8 elements: on a model this small every
            # gradient is in flight at once, on top of the partition the planner counts (the bucket is
            # in the planner's `buffers`). The partition alone is checked after backward.
            assert planned["grads"] <= row["grads"] <= planned["grads"] + 4 * psi, (name, row, planned)
            assert row["grads_held"] == pytest.approx(planned["grads"], rel=0.05), (name, row, planned)
        elif strategy == "fsdp" and not kind:
            # FSDP2 (the embedding and the head each their own unit): one unit's unsharded gradient
            # is alive while it is reduce-scattered, counted in the planner's `buffers` (one block).
            assert planned["grads"] <= row["grads"] <= planned["grads"] + 4 * shape.layer_params, (name, row)
            assert row["grads_held"] == pytest.approx(planned["grads"], rel=0.05), (name, row, planned)
        else:
            assert row["grads"] == pytest.approx(planned["grads"], rel=0.05), (name, row, planned)
