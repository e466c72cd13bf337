"""The planner's per-rank host figure against a real 2-rank CPU run (issue 17).

A ~150M-parameter Llama is built from a config and saved as bf16 safetensors in several files,
then trained for one step with `model=hf_local adapter=lora strategy=fsdp` on 2 gloo ranks. The
measured figure is the peak resident set of the worst rank over the whole run (the kernel's
ru_maxrss of the torchrun tree: no sampling to miss a peak) minus the same
run's peak with `model=tiny` (imports and engines). On the CPU the planner's "device" bytes are
host bytes too, so its per-rank peak minus its CPU baseline is what the run should measure.
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
RUN = ["strategy=fsdp", "adapter=lora", "trainer.device=cpu", "trainer.max_steps=1", "trainer.seq_len=32",
       "trainer.micro_batch_size=1", "checkpoint.at_end=false", "export=none", "tracking=none",
       "tracking.progress=false"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama150m")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100MB")
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


# The peak is read by a small parent of torchrun: a child exec'd from a process inherits that
# process's resident set as its starting ru_maxrss, so pytest (a gigabyte with torch loaded)
# must not be the parent of the processes measured.
MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def peak_rss(args: list[str], run_dir: Path) -> int:
    """Bytes: the largest peak resident set of any process of a 2-rank run (torchrun and its ranks),
    from the kernel's accounting of the reaped tree (no sampling that could miss a peak)."""
    proc = subprocess.run([PY, "-c", MEASURE, *train_cmd([*args, f"run.dir={run_dir}"], nproc=2)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return int(proc.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) * 1024


def planned_per_rank(overrides: list[str]) -> int:
    """The planner's per-rank host peak (minus its own baseline) for this run."""
    from launch.config import load_launch
    from launch.host import BASELINE
    from launch.plan import plan_request

    raw = compose_train(overrides)
    raw.update(target="local", dry_run=False, launch={"nproc_per_node": 2})
    req = load_launch(raw, planning=True)
    return plan_request(req.train, req.launch)["host_bytes_per_node"]["per_rank"]["peak"] - BASELINE["cpu"]


@pytest.mark.skip(reason="issue 17, open: on the meta-device path the peak before step 1 is near the plan "
                         "(FSDP+LoRA +0.63x the bf16 files), but every rank grows ~1.5 GB during step 1 "
                         "(about 35 MB per decoder layer kept through the forward; cause not found), so the "
                         "whole-run peak is ~2.9x the plan (docs/BENCHMARKS.md, start-up)")
def test_planner_matches_measured_peak(model_dir, tmp_path):
    model = ["model=hf_local", f"model.path={model_dir}"]
    baseline = peak_rss(["model=tiny", *RUN], tmp_path / "tiny")
    measured = peak_rss([*model, *RUN], tmp_path / "model")
    planned = planned_per_rank([*model, *RUN])
    delta = measured - baseline
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    report = (f"measured {delta / 2**20:.0f} MiB over the tiny baseline ({baseline / 2**20:.0f} MiB), "
              f"planned {planned / 2**20:.0f} MiB, bf16 files {weights / 2**20:.0f} MiB")
    print(report)
    assert delta == pytest.approx(planned, rel=0.15), report


def test_bench_startup_smoke(tmp_path):
    """bench/startup.py --smoke: one tiny 2-rank case end to end, its JSON line last, ratios first."""
    proc = subprocess.run([PY, "bench/startup.py", "--smoke", f"--cache={tmp_path}"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out) == ["ratios", "rows"] and list(out["ratios"]) == ["smoke/fsdp/lora/today"]
    row = out["rows"][0]
    assert row["peak_over_baseline_mib"] > 100 and row["planned_mib"] >= 0 and row["wall_s"] > 0
