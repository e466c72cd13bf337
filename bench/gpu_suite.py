"""One-shot GPU suite: tokens/s, MFU, peak memory and checkpoint stall of llama3_1b on one GPU.

    python bench/gpu_suite.py                 # one H200 (or any CUDA GPU), built to finish in < 8 min
    python bench/gpu_suite.py --smoke         # the same code on CPU with the tiny model (a minute or two)

Every case is a real `torchrun --nproc_per_node 1 -m train` run; the suite reads its
metrics.jsonl. Cases: fsdp and zero3 (ddp too: llama3_1b fits one GPU), eager vs compiled
(trainer.compile=true), sdpa vs flex vs flash attention, plain vs chunked loss, and a checkpoint
stall sync vs async (checkpoint.async=true). Settings this checkout does not have yet
(a ConfigError naming the key) and kernels the machine cannot run are reported as skipped, not
as failures. Tokens/s and MFU (the tracker's formula, train/tracking/flops.py) are medians
over the steps after warm-up; peak memory is torch's max allocated; the planner's estimate
(launch/plan.py) is printed beside it. Ends with a Markdown table (also written to
--out/RESULTS.md) and one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
           TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


@dataclass
class Case:
    name: str
    overrides: list[str]
    needs: str = ""
    """A kernel the case needs: `cuda` (flex backward, flash) or `flash_attn` (package)."""
    result: dict = field(default_factory=dict)


def cases(smoke: bool) -> list[Case]:
    fsdp = ["strategy=fsdp"]
    ckpt = ["checkpoint.every_steps=4", "checkpoint.keep_last=1"]
    out = [
        Case("fsdp eager sdpa chunked", fsdp),
        Case("fsdp compiled sdpa chunked", [*fsdp, "trainer.compile=true"]),
        Case("fsdp eager flex chunked", [*fsdp, "model.attention=flex"], needs="cuda"),
        Case("fsdp eager flash chunked", [*fsdp, "model.attention=flash"], needs="flash_attn"),
        Case("fsdp eager sdpa plain", [*fsdp, "trainer.loss=plain"]),
        Case("zero3 eager sdpa chunked", ["strategy=zero3"]),
        Case("ddp eager sdpa chunked", ["strategy=ddp"]),
        Case("fsdp checkpoint sync", [*fsdp, *ckpt]),
        Case("fsdp checkpoint async", [*fsdp, *ckpt, "checkpoint.async=true"]),
    ]
    if not smoke:
        out.insert(2, Case("fsdp compiled flex chunked", [*fsdp, "trainer.compile=true", "model.attention=flex"],
                           needs="cuda"))
    return out


def base_overrides(smoke: bool, steps: int) -> list[str]:
    if smoke:
        return ["model=tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", f"trainer.max_steps={steps}",
                "trainer.device=cpu", "schedule=constant"]
    # Packed 2048-token rows (the MPT anchor's sequence length), 16k tokens per step.
    return ["model=llama3_1b", "trainer.seq_len=2048", "trainer.micro_batch_size=8", f"trainer.max_steps={steps}",
            "schedule=constant", "trainer.log_every=1"]


def missing(case: Case) -> str | None:
    """Why this machine cannot run the case, or None."""
    import importlib.util

    import torch

    if case.needs in ("cuda", "flash_attn") and not torch.cuda.is_available():
        return "needs CUDA"
    if case.needs == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    return None


def run_case(case: Case, args: argparse.Namespace, out: Path) -> None:
    why = missing(case)
    if why:
        case.result = {"skipped": why}
        return
    run_dir = out / case.name.replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # this suite's own case directory: each case starts fresh
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
           *base_overrides(args.smoke, args.steps), *case.overrides, f"run.dir={run_dir}", "checkpoint.resume=false"]
    if not any(o.startswith("checkpoint.every_steps") for o in case.overrides):
        cmd.append("checkpoint.at_end=false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=args.case_timeout)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        unknown = [k for k in ("trainer.compile", "checkpoint.async") if f"{k}: unknown key" in text]
        case.result = ({"skipped": f"{unknown[0]} not in this checkout"} if unknown
                       else {"failed": text[-2000:]})
        return
    case.result = {"wall_s": round(wall, 1), **summarize(run_dir / "metrics.jsonl", args.warmup)}


def summarize(path: Path, warmup: int) -> dict:
    """Medians after warm-up, the peak memory, and checkpoint stalls (mean)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    steady = steps[warmup:] or steps
    med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None) \
        if any(r.get(k) is not None for r in steady) else None  # noqa: E731
    stalls = [r["checkpoint_time_s"] for r in rows if "checkpoint_time_s" in r]
    return {"tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "step_time_s": med("step_time_s"),
            "mem_peak_gb": max(r["mem_peak_gb"] for r in steps), "final_loss": steps[-1]["loss"],
            "checkpoint_stall_s": round(statistics.mean(stalls), 3) if stalls else None}


def planned_gb(case: Case, args: argparse.Namespace) -> float | None:
    """The memory planner's per-GPU total for the same settings (no torch in the planner)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launch.config import LaunchConfig
    from launch.plan import plan_request
    from train.config import ConfigError, load_config

    overrides = [*base_overrides(args.smoke, args.steps), *case.overrides]
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            raw = OmegaConf.to_container(compose("train", overrides), resolve=True)
        cfg = load_config(raw, world_size=1)
    except ConfigError:
        return None
    gpu = "h200_141gb" if not args.smoke else "rtx4090_24gb"
    return round(plan_request(cfg, LaunchConfig(gpus_per_node=1, gpu=gpu))["per_gpu_bytes"]["total"] / 2**30, 2)


def table(all_cases: list[Case]) -> str:
    head = "| case | tokens/s | MFU | step s | peak GiB | planned GiB | ckpt stall s | note |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in all_cases:
        r = c.result
        f = lambda k, fmt="{:.3g}": fmt.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        note = r.get("skipped") or ("FAILED" if "failed" in r else "")
        lines.append(f"| {c.name} | {f('tokens_per_s', '{:.0f}')} | {f('mfu', '{:.1%}')} | {f('step_time_s')} | "
                     f"{f('mem_peak_gb')} | {f('planned_gb')} | {f('checkpoint_stall_s')} | {note} |")
    return "\n".join(lines)


def ratios(by: dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str):
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    return {"compiled_over_eager_tokens_per_s": ratio("fsdp compiled sdpa chunked", "fsdp eager sdpa chunked",
                                                      "tokens_per_s"),
            "flex_over_sdpa_tokens_per_s": ratio("fsdp eager flex chunked", "fsdp eager sdpa chunked", "tokens_per_s"),
            "flash_over_sdpa_tokens_per_s": ratio("fsdp eager flash chunked", "fsdp eager sdpa chunked",
                                                  "tokens_per_s"),
            "chunked_over_plain_peak_mem": ratio("fsdp eager sdpa chunked", "fsdp eager sdpa plain", "mem_peak_gb"),
            "async_over_sync_ckpt_stall": ratio("fsdp checkpoint async", "fsdp checkpoint sync", "checkpoint_stall_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the suite itself")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 12, smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 4, smoke 1)")
    p.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains one of these")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_suite")
    p.add_argument("--case-timeout", type=float, default=240)
    args = p.parse_args()
    args.steps = args.steps or (4 if args.smoke else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in cases(args.smoke) if not args.only or any(o in c.name for o in args.only)]
    t0 = time.perf_counter()
    for case in chosen:
        run_case(case, args, args.out)
        if "skipped" not in case.result and "failed" not in case.result:
            case.result["planned_gb"] = planned_gb(case, args)
        print(f"{case.name}: {json.dumps(case.result)[:300]}", file=sys.stderr, flush=True)
    md = table(chosen)
    (args.out / "RESULTS.md").write_text(md + "\n")
    print(md)
    by = {c.name: c.result for c in chosen}
    print(json.dumps({**ratios(by), "smoke": args.smoke, "total_s": round(time.perf_counter() - t0, 1),
                      "cases": by}))


if __name__ == "__main__":
    main()
