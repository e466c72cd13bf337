"""Host memory of a real 2-rank CPU run against the planner and the issue's bounds (issue 17).

Two Llamas are built from a config and saved as bf16 safetensors in several files, then trained
on 2 gloo ranks with `model=hf_local` under `fsdp` and `zero3`: a ~395M-parameter one (hidden
2048, 8 layers) with `adapter=lora` for one step, and a ~150M one (hidden 1024, 12 layers) fully
fine-tuned for two steps (see STEPS). The measured figure is the peak resident set of the
worst process over the whole run (the kernel's ru_maxrss of the torchrun tree: no sampling to
miss a peak) minus the same command's peak with `model=tiny` (imports and engines). On the CPU the
planner's "device" bytes are host bytes too, so its per-rank peak minus its CPU baseline is what
the run should measure. With full fine-tuning no rank may hold a full fp32 copy before step 1.

Why the LoRA case needs a wide model: at hidden 1024 LoRA's fp32 state (r=16 on every projection:
parameters, gradients and Adam's two moments) is 0.10x of the bf16 files per rank on 2 ranks, so
with the base's half (0.50x) the issue's 0.6x is gone before anything is gathered; at hidden 2048 it
is 0.05x, and 0.02x for an 8B model. Measured here (per rank over the tiny run, as a fraction of
the bf16 files), with activation checkpointing: fsdp+lora 0.57x, zero3+lora 0.59x; a second step
adds Adam's two moments (0.025x: 0.60x and 0.62x). docs/BENCHMARKS.md, "One frozen weight at a time"
and "ZeRO-3's CPU settings".
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PY, REPO, child_env, compose_train, train_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=4)
LORA_SHAPE = dict(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4)
RUN = ["trainer.device=cpu", "trainer.max_steps=1", "trainer.seq_len=32", "trainer.micro_batch_size=1",
       "checkpoint.at_end=false", "export=none", "tracking=none", "tracking.progress=false"]
LORA_RUN = {s: ["adapter=lora", "trainer.activation_checkpointing=true"] for s in ("fsdp", "zero3")}
"""LoRA with activation checkpointing, as a big model is fine-tuned: each recomputed frozen weight is
released right after its recomputation (train/strategies/parallelize.py `_reshard_after_recompute`,
deepspeed.py `_release_after_recompute`)."""
ISSUE_GOAL = 0.6
"""Issue 17: per-rank peak over the tiny baseline with adapter=lora under fsdp/zero3 on 2 ranks,
at most 0.6 x the bf16 weight files."""
LORA_BOUND = {"fsdp": ISSUE_GOAL, "zero3": ISSUE_GOAL}
"""Both meet the goal: fsdp 0.57x, zero3 0.59x measured. Without one frozen unit at a time fsdp
measured 0.77x; zero3 measured 0.74x without the release after recomputation, and 0.62x with it but
with DeepSpeed's own sub-groups, persistence and a separate fp32 master (its optimizer step was the
peak: train/strategies/deepspeed.py `CPU_ZERO3`, `_share_fp32_masters`): each bound fails on the
code before its fix."""


def save_llama(out: Path, shape: dict, shard: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size=shard)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama150m"), SHAPE, "100MB")


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama395m"), LORA_SHAPE, "200MB")


# The peak is read by a small parent of torchrun: a child exec'd from a process inherits that
# process's resident set as its starting ru_maxrss, so pytest (a gigabyte with torch loaded)
# must not be the parent of the processes measured.
MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measure(args: list[str], run_dir: Path) -> dict:
    """A 2-rank run: `peak` (bytes, the largest peak resident set of any process of the run, from the
    kernel's accounting of the reaped tree) and its `startup` record (train/startup.py)."""
    proc = subprocess.run([PY, "-c", MEASURE, *train_cmd([*RUN, *args, f"run.dir={run_dir}"], nproc=2)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    startup = next(r["startup"] for r in records if "startup" in r)
    return {"peak": int(proc.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) * 1024, "startup": startup}


def planned_per_rank(overrides: list[str]) -> int:
    """The planner's per-rank host peak (minus its own baseline) for this run."""
    from launch.config import load_launch
    from launch.host import BASELINE
    from launch.plan import plan_request

    raw = compose_train([*RUN, *overrides])
    raw.update(target="local", dry_run=False, launch={"nproc_per_node": 2})
    req = load_launch(raw, planning=True)
    return plan_request(req.train, req.launch)["host_bytes_per_node"]["per_rank"]["peak"] - BASELINE["cpu"]


def _build_deepspeed_ops() -> None:
    """DeepSpeed's process group builds its CPU shared-memory op with a C++ compiler in the first
    process that needs it (into $TORCH_EXTENSIONS_DIR, .venv/torch_extensions under make): a
    compiler run inside a measured run would be its peak (a tiny zero3 run once measured 1.5 GiB).
    `make setup` builds it once, but DeepSpeed rebuilds it when its build file changes; loading it
    here, outside the measurement, makes sure."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


STEPS = {"fsdp": 2, "zero3": 2}
"""Steps of each full fine-tune: the planner plans the steady state, Adam's state present through
forward and backward. Both engines create it in step 1's optimizer step, so step 2 is the first to
show it (FSDP's step 1 alone peaks 10-15% lower). Under ZeRO-3 step 2 is also where DeepSpeed's
defaults kept every module it would reuse within 1e9 elements gathered (2333 MiB for this model
against 1272 MiB with deepspeed.py `CPU_ZERO3`, planned 1288): two steps catch that too."""


@pytest.fixture(scope="module", params=["fsdp", "zero3"])
def runs(request, model_dir, lora_model_dir, tmp_path_factory) -> dict:
    """Per strategy: LoRA on the wide model and full fine-tuning (STEPS) on the narrow one, each
    with its tiny baseline (the same command with model=tiny)."""
    strategy = request.param
    if strategy.startswith("zero"):
        _build_deepspeed_ops()
    tmp = tmp_path_factory.mktemp(strategy)
    lora = [f"strategy={strategy}", *LORA_RUN[strategy]]
    none = [f"strategy={strategy}", "adapter=none", f"trainer.max_steps={STEPS[strategy]}"]
    out = {"strategy": strategy, "args": {"lora": ["model=hf_local", f"model.path={lora_model_dir}", *lora],
                                          "none": ["model=hf_local", f"model.path={model_dir}", *none]},
           "files": {"lora": _files(lora_model_dir), "none": _files(model_dir)}}
    for case in ("lora", "none"):
        out[case] = measure(out["args"][case], tmp / case)
        out[f"tiny_{case}"] = measure(["model=tiny", *(lora if case == "lora" else none)], tmp / f"tiny_{case}")
    return out


def _files(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_planner_matches_measured_peak(runs, adapter):
    delta = runs[adapter]["peak"] - runs[f"tiny_{adapter}"]["peak"]
    planned = planned_per_rank(runs["args"][adapter])
    report = (f"{runs['strategy']} adapter={adapter}: measured {mib(delta)} over the tiny baseline "
              f"({mib(runs[f'tiny_{adapter}']['peak'])}), planned {mib(planned)}, bf16 files {mib(runs['files'][adapter])}")
    print(report)
    assert delta == pytest.approx(planned, rel=0.15), report


def test_lora_peak_over_the_bf16_files(runs):
    ratio = (runs["lora"]["peak"] - runs["tiny_lora"]["peak"]) / runs["files"]["lora"]
    bound = LORA_BOUND[runs["strategy"]]
    print(f"{runs['strategy']}+lora: {ratio:.3f}x the bf16 files")
    assert ratio <= bound, (f"{runs['strategy']}+lora on 2 ranks: per-rank peak over the tiny baseline is "
                            f"{ratio:.3f}x the bf16 files; held at {bound}x, the issue's goal is {ISSUE_GOAL}x")


def test_full_finetune_never_holds_a_full_fp32_copy(runs):
    """Before the first step every FSDP rank holds its fp32 shard (half the model on 2 ranks) and
    one parameter in flight, never the whole model in fp32 (twice the bf16 files). Under ZeRO-3
    the figure before step 1 also holds what `deepspeed.initialize` allocates from the partitions
    (its flat partition buffer, gradient partition and optimizer set-up: ~3.3x a partition on
    2 ranks, more than one full copy although all of it is 1/N), so there the bound is checked
    on the load phase, where the old path built the whole model (rank 0's `phase_peak_rss_bytes`)."""
    fp32_copy = 2 * runs["files"]["none"]
    tiny, full = runs["tiny_none"]["startup"], runs["none"]["startup"]
    base = max(tiny["rank_peak_rss_bytes_before_first_step"])
    before = [p - base for p in full["rank_peak_rss_bytes_before_first_step"]]
    if runs["strategy"] == "fsdp":
        held, what = before, "per rank before step 1"
    else:
        held = [full["phase_peak_rss_bytes"]["load"] - tiny["phase_peak_rss_bytes"]["load"]]
        what = f"rank 0 through loading (per rank before step 1: {[mib(b) for b in before]})"
    report = (f"{runs['strategy']} full fine-tune, {what} over the tiny baseline: {[mib(r) for r in held]}; "
              f"a full fp32 copy is {mib(fp32_copy)}")
    print(report)
    assert held and all(r < 0.75 * fp32_copy for r in held), report
    # the twin: the figure sees the rank's fp32 shard, so a whole copy could not hide in it
    assert all(r > 0.4 * fp32_copy for r in held), report


def test_bench_startup_smoke(tmp_path):
    """bench/startup.py --smoke: one tiny 2-rank case end to end, its JSON line last, ratios first."""
    proc = subprocess.run([PY, "bench/startup.py", "--smoke", f"--cache={tmp_path}"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out) == ["ratios", "rows"] and list(out["ratios"]) == ["smoke/fsdp/lora/today/2"]
    row = out["rows"][0]
    assert row["peak_over_baseline_mib"] > 100 and row["planned_mib"] >= 0 and row["wall_s"] > 0
    assert row["ranks"] == 2 and row["before_step1_over_shard"] > 0
