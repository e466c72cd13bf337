"""GPU suite: tokens/s, MFU, peak memory, checkpoint stall and load time of llama3_1b on one GPU.

    python bench/gpu_suite.py --out runs/gpu_suite                 # one CUDA GPU; the default set
    python bench/gpu_suite.py --budget-s 420 --out DIR             # a short allocation: what fits
    python bench/gpu_suite.py --only "fsdp eager" lora --out DIR   # cases whose name contains one of these
    python bench/gpu_suite.py --smoke --out DIR                    # CPU stand-ins of every case (< 2 min)

Built so that a short allocation on a shared node always leaves its figures:
- every case is a real `torchrun --nproc_per_node 1 -m train` run in its own process group
  (session) with its own timeout; a case over its time is killed as a group (the torchrun worker
  with it, so no orphan holds GPU memory) and recorded as `timeout`, and the suite goes on;
- RESULTS.md and results.json in --out are rewritten after every case (a failure is one line in
  the JSON, its full log in logs/); each case's checkpoints are deleted once summarized;
- cases run cheapest first, compiled ones last; --budget-s skips what cannot finish in the time left;
- `trainer.device=cuda` is forced, and without a CUDA device the suite refuses (except --smoke).

Tokens/s, step time and MFU (train/tracking/flops.py) are medians after the warm-up steps; peak
memory is torch's max allocated, beside the planner's estimate (launch/plan.py); the checkpoint
stall is the time training stood still for one save in the middle of the run (async: staging
only, the write goes on while training continues; no earlier write is pending, and the final
save is not timed); time to first step is measured from the case's start by watching metrics.jsonl.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the planner (launch/) of this checkout, for the planned-memory column
HF_MODEL_DIR = "_hf_model"  # the from-config model saved as safetensors for the real-loading case


def child_env() -> dict[str, str]:
    """This environment plus ours: PYTHONPATH is prepended to (packages installed with --target stay)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@dataclass
class Case:
    name: str
    overrides: list[str]
    est_s: float = 45.0
    """Expected wall time on one H100 (ordering and --budget-s); a guess until measured there."""
    needs: str = ""
    """What the case needs beyond torch: `cuda`, or an optional package (`flash_attn`)."""
    compiled: bool = False
    steps: int | None = None
    """Optimizer steps of this case (default: --steps)."""
    hf_model: bool = False
    """Trains the from-config model saved as safetensors (model=hf_local): the real-loading path."""
    command: list[str] | None = None
    """A fixed command instead of the trainer (tests of the orchestration); `{run_dir}` is filled in."""
    timeout_s: float | None = None
    result: dict = field(default_factory=dict)


def cases(smoke: bool, extended_too: bool = False) -> list[Case]:
    """The default set: about 8 minutes on one H100 (the est_s are estimates until measured there)."""
    fsdp, packed = ["strategy=fsdp"], ["data.doc_len=512" if not smoke else "data.doc_len=8"]
    # One save in the middle of the run (step 5 of 9): nothing earlier is pending, the last step saves nothing.
    ckpt = ["checkpoint.every_steps=5", "checkpoint.keep_last=1", "checkpoint.at_end=false"]
    default = [
        Case("fsdp eager sdpa chunked", fsdp, est_s=35),
        Case("ddp eager sdpa chunked", ["strategy=ddp"], est_s=35),
        Case("fsdp eager sdpa plain", [*fsdp, "trainer.loss=plain"], est_s=35),
        Case("fsdp eager sdpa packed", [*fsdp, *packed], est_s=35),
        Case("fsdp eager flex packed", [*fsdp, *packed, "model.attention=flex"], est_s=40, needs="cuda"),
        Case("fsdp eager flash packed", [*fsdp, *packed, "model.attention=flash"], est_s=35, needs="flash_attn"),
        Case("fsdp lora", [*fsdp, "adapter=lora"], est_s=30),
        Case("fsdp hf_local load", fsdp, est_s=60, hf_model=True, steps=4),
        Case("fsdp checkpoint sync", [*fsdp, *ckpt], est_s=45, steps=9),
        Case("fsdp checkpoint async", [*fsdp, *ckpt, "checkpoint.async=true"], est_s=40, steps=9),
        Case("fsdp compiled sdpa chunked", [*fsdp, "trainer.compile=true"], est_s=90, compiled=True),
    ]
    extended = [  # --all: past the 8 minutes
        Case("zero3 eager sdpa chunked", ["strategy=zero3"], est_s=50),
        Case("fsdp compiled flex packed", [*fsdp, *packed, "model.attention=flex", "trainer.compile=true"], est_s=120,
             needs="cuda", compiled=True),
    ]
    return default + extended if extended_too else default


def ordered(chosen: list[Case]) -> list[Case]:
    """Cheapest first, compiled last: the figures that matter most arrive first."""
    return sorted(chosen, key=lambda c: (c.compiled, c.est_s))


def base_overrides(smoke: bool) -> list[str]:
    if smoke:
        return ["model=tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.device=cpu",
                "schedule=constant", "trainer.log_every=1"]
    # Packed 2048-token rows (the MPT anchor's sequence length), 16k tokens per step, bf16 on the GPU.
    return ["model=llama3_1b", "trainer.seq_len=2048", "trainer.micro_batch_size=8", "trainer.device=cuda",
            "schedule=constant", "trainer.log_every=1"]


def environment() -> dict:
    """Versions and hardware, for the first lines and the results' header."""
    import torch

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           **{d: version(d) for d in ("transformers", "deepspeed", "peft")},
           "kernels": {d: version(d) for d in ("flash-attn", "liger-kernel", "bitsandbytes")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    return env


def missing(case: Case, smoke: bool) -> str | None:
    """Why this machine cannot run the case, or None."""
    import torch

    if case.needs == "cuda" and not torch.cuda.is_available():
        return "needs CUDA"
    if case.needs and case.needs != "cuda":
        if not torch.cuda.is_available():
            return "needs CUDA"
        if importlib.util.find_spec(case.needs) is None:
            return f"{case.needs} not installed"
    return None


def command(case: Case, args: argparse.Namespace, run_dir: Path) -> list[str]:
    if case.command is not None:
        return [part.replace("{run_dir}", str(run_dir)) for part in case.command]
    model = ["model=hf_local", f"model.path={args.out / HF_MODEL_DIR}"] if case.hf_model else []
    # On the GPU a real torchrun launch; the CPU stand-ins save its start-up (the trainer makes its own group).
    launcher = [] if args.smoke else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return [sys.executable, *launcher, "-m", "train",
            *base_overrides(args.smoke), f"trainer.max_steps={case.steps or args.steps}", *case.overrides, *model,
            f"run.dir={run_dir}", "checkpoint.resume=false",
            *([] if any(o.startswith("checkpoint.") for o in case.overrides) else ["checkpoint.at_end=false"])]


def run_group(cmd: list[str], log_path: Path, timeout_s: float, watch: Path | None = None) -> tuple[str, float, float | None]:
    """Run `cmd` in its own session; kill the whole group when it runs over. Returns (status, wall
    seconds, seconds until `watch` first held a training step). status: ok | failed | timeout."""
    t0 = time.perf_counter()
    first = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout_s:
                    kill_group(proc)
                    return "timeout", time.perf_counter() - t0, first
                if first is None and watch is not None and watch.exists() and '"loss"' in watch.read_text():
                    first = time.perf_counter() - t0
                time.sleep(0.25)
        except BaseException:  # Ctrl-C or the allocation's SIGTERM: leave no group behind
            kill_group(proc)
            raise
    return ("ok" if proc.returncode == 0 else "failed"), time.perf_counter() - t0, first


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (the trainer checkpoints nothing here: --out is scratch), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children may linger a moment
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def one_line(log_path: Path) -> str:
    """The failure in one line: the last line that names an error, else the last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    named = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
    return ((named or lines or ["(no output)"])[-1])[:300]


def run_case(case: Case, args: argparse.Namespace, time_left: float | None) -> dict:
    why = missing(case, args.smoke)
    if why:
        return {"status": "skipped", "why": why}
    if time_left is not None and case.est_s > time_left:
        return {"status": "skipped", "why": f"budget: needs ~{case.est_s:.0f} s, {time_left:.0f} s left"}
    slug = case.name.replace(" ", "_")
    run_dir, log_path = args.out / "runs" / slug, args.out / "logs" / f"{slug}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timeout = min(x for x in (case.timeout_s or args.case_timeout, time_left) if x is not None)
    if case.hf_model and not (args.out / HF_MODEL_DIR / "config.json").exists():
        status, _, _ = run_group([sys.executable, str(Path(__file__).resolve()), "--save-model", str(args.out / HF_MODEL_DIR),
                                  "--model-name", "tiny" if args.smoke else "llama3_1b"],
                                 args.out / "logs" / "save_model.log", timeout)
        if status != "ok":
            return {"status": status, "error": "saving the model: " + one_line(args.out / "logs" / "save_model.log"),
                    "log": str(Path("logs") / "save_model.log")}
    metrics = run_dir / "metrics.jsonl"
    status, wall, first = run_group(command(case, args, run_dir), log_path, timeout, watch=metrics)
    out: dict = {"status": status, "wall_s": round(wall, 1), "log": str(log_path.relative_to(args.out))}
    if first is not None:
        out["first_step_s"] = round(first, 1)
    text = log_path.read_text(errors="replace")
    unknown = [line.split(": unknown key")[0].split()[-1] for line in text.splitlines() if ": unknown key" in line]
    if status == "failed" and unknown:
        out.update(status="skipped", why=f"{unknown[0]} not in this checkout")
    elif status == "failed":
        out["error"] = one_line(log_path)
    elif status == "timeout":
        out["error"] = f"over its {timeout:.0f} s: killed with its process group"
    if status == "ok":
        try:
            out.update(summarize(metrics, args.warmup))
        except (OSError, ValueError, KeyError, StopIteration) as e:
            out.update(status="failed", error=f"no figures in {metrics.name}: {e}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a 1B case leaves ~15 GB otherwise
    return out


def summarize(path: Path, warmup: int) -> dict:
    """Medians after warm-up, the peak memory, and the checkpoint stall (the mid-run save)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise ValueError("no training step logged")
    steady = steps[warmup:] or steps

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    stalls = [r["checkpoint_time_s"] for r in rows if "checkpoint_time_s" in r and r["step"] < steps[-1]["step"]]
    return {"tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "step_time_s": med("step_time_s"),
            "mem_peak_gb": max(r.get("mem_peak_gb") or 0 for r in steps), "final_loss": steps[-1]["loss"],
            "checkpoint_stall_s": round(stalls[0], 3) if stalls else None}


def planned_gb(case: Case, args: argparse.Namespace) -> float | None:
    """The memory planner's per-GPU total for the same settings (no torch in the planner)."""
    if case.command is not None or case.hf_model:
        return None
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from launch.config import LaunchConfig
        from launch.plan import plan_request
        from train.config import load_config

        overrides = [*base_overrides(args.smoke), *case.overrides, "trainer.device=auto"]
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            raw = OmegaConf.to_container(compose("train", overrides), resolve=True)
        cfg = load_config(raw, world_size=1)
        gpu = "rtx4090_24gb" if args.smoke else "h100_80gb"
        return round(plan_request(cfg, LaunchConfig(gpus_per_node=1, gpu=gpu))["per_gpu_bytes"]["total"] / 2**30, 2)
    except Exception:  # noqa: BLE001 - an estimate beside the figure; never worth losing the suite for
        return None


def table(all_cases: list[Case]) -> str:
    head = ("| case | status | tokens/s | MFU | step s | peak GiB | planned GiB | ckpt stall s | first step s "
            "| note |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in all_cases:
        r = c.result
        f = lambda k, fmt="{:.3g}": fmt.format(r[k]) if r.get(k) is not None else ""
        note = r.get("why") or r.get("error") or ""
        lines.append(f"| {c.name} | {r.get('status', 'pending')} | {f('tokens_per_s', '{:.0f}')} | {f('mfu', '{:.1%}')} "
                     f"| {f('step_time_s')} | {f('mem_peak_gb')} | {f('planned_gb')} | {f('checkpoint_stall_s')} "
                     f"| {f('first_step_s')} | {note[:160].replace('|', '/')} |")
    return "\n".join(lines)


def ratios(by: dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str):
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    eager = "fsdp eager sdpa chunked"
    return {"compiled_over_eager_tokens_per_s": ratio("fsdp compiled sdpa chunked", eager, "tokens_per_s"),
            "flex_over_sdpa_packed_tokens_per_s": ratio("fsdp eager flex packed", "fsdp eager sdpa packed", "tokens_per_s"),
            "flash_over_sdpa_packed_tokens_per_s": ratio("fsdp eager flash packed", "fsdp eager sdpa packed",
                                                         "tokens_per_s"),
            "chunked_over_plain_peak_mem": ratio(eager, "fsdp eager sdpa plain", "mem_peak_gb"),
            "async_over_sync_ckpt_stall": ratio("fsdp checkpoint async", "fsdp checkpoint sync", "checkpoint_stall_s")}


def write_results(out: Path, env: dict, chosen: list[Case], smoke: bool, t0: float) -> None:
    """RESULTS.md and results.json, rewritten whole (atomically) after every case."""
    by = {c.name: c.result for c in chosen}
    doc = {"smoke": smoke, "elapsed_s": round(time.perf_counter() - t0, 1), "env": env, "ratios": ratios(by), "cases": by}
    md = "\n".join([f"# GPU suite{' (smoke, CPU stand-ins)' if smoke else ''}", "",
                    *[f"- {k}: {v}" for k, v in env.items()], "", table(chosen), "",
                    "ratios: " + json.dumps(doc["ratios"]), ""])
    for name, text in (("results.json", json.dumps(doc, indent=1) + "\n"), ("RESULTS.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def save_model(path: Path, name: str) -> None:
    """A from-config Llama (conf/model/NAME.yaml) saved with save_pretrained as safetensors (bf16 on a
    GPU), so that the real-loading case reads a checkpoint of the same size as a pretrained one."""
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    config = LlamaConfig(vocab_size=fields.get("vocab_size") or 256, **{k: fields[k] for k in keys})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {path}")


def run_suite(chosen: list[Case], args: argparse.Namespace, env: dict) -> None:
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, env, chosen, args.smoke, t0)
    for case in chosen:
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t0)
        case.result = run_case(case, args, left)
        if case.result["status"] == "ok":
            case.result["planned_gb"] = planned_gb(case, args)
        write_results(args.out, env, chosen, args.smoke, t0)
        print(f"{case.name}: {json.dumps(case.result)[:300]}", file=sys.stderr, flush=True)
    shutil.rmtree(args.out / HF_MODEL_DIR, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU stand-ins of every case (tiny model): checks the suite")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 10, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 3, smoke 1)")
    p.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains one of these")
    p.add_argument("--all", action="store_true", help="the extended set too (zero3, compiled flex): past 8 minutes")
    p.add_argument("--budget-s", type=float, default=None, help="skip cases that cannot finish in the time left")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds per case (default 300, smoke 90)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_suite")
    p.add_argument("--save-model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-name", default="llama3_1b", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.save_model:
        save_model(args.save_model, args.model_name)
        return 0
    args.steps = args.steps or (3 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.case_timeout = args.case_timeout or (90 if args.smoke else 300)
    args.out = args.out.resolve()
    # The allocation's end (SIGTERM) unwinds like Ctrl-C: the running case's group is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = environment()
    for key, value in env.items():
        print(f"{key}: {value}", flush=True)
    if not args.smoke and not env.get("gpu"):
        print(f"error: no CUDA device visible (torch {env['torch']}, built with CUDA {env['cuda']}): this suite "
              "measures GPUs. Run it on a GPU node with a CUDA build of torch, or use --smoke for the CPU "
              "stand-ins.", file=sys.stderr)
        return 2
    every = cases(args.smoke, extended_too=args.all or bool(args.only))
    chosen = ordered([c for c in every if not args.only or any(o in c.name for o in args.only)])
    if not chosen:
        print(f"error: --only {args.only} matches no case; cases: {[c.name for c in every]}",
              file=sys.stderr)
        return 2
    run_suite(chosen, args, env)
    print(table(chosen))
    print(f"results: {args.out / 'RESULTS.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
