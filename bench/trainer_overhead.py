"""What does `python -m train` cost per step over a hand-written PyTorch loop?

Both sides train the same model (seeded Llama built by train.model) on the same synthetic
batches with the same AdamW, LR schedule and clipping, in separate processes with the same
thread count. The trainer's time per step comes from its own metrics.jsonl windows
(`tokens_per_s` covers every step of a `log_every` window, logging and checks included);
the baseline times the same windows. The first window is warm-up and is dropped. Rounds
alternate to spread machine noise; the fastest window of each side is compared.

    .venv/bin/python bench/trainer_overhead.py [--steps 200] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MICRO, SEQ, WINDOW = 4, 64, 50


def overrides(steps: int, run_dir: str) -> list[str]:
    return ["model=tiny", *[f"model.{k}={v}" for k, v in MODEL.items()], f"trainer.micro_batch_size={MICRO}",
            f"trainer.seq_len={SEQ}", f"trainer.max_steps={steps}", f"trainer.log_every={WINDOW}",
            "checkpoint.at_end=false", "schedule=cosine", f"run.dir={run_dir}"]


def baseline_worker(steps: int) -> None:
    """The hand-written loop: nanoGPT-style, nothing but the math."""
    import torch
    import torch.nn.functional as F

    from data_pipeline.read.config import SyntheticDataConfig
    from data_pipeline.read.synthetic import SyntheticLoader
    from train.config import ModelConfig, OptimConfig, ScheduleConfig
    from train.model import build_model
    from train.schedule import build_scheduler
    from train.strategies.base import param_groups

    model = build_model(ModelConfig(**MODEL), 256, seed=0)
    o = OptimConfig()
    opt = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps)  # as TorchOptim
    sched = build_scheduler(opt, ScheduleConfig(), steps)
    batches = iter(SyntheticLoader(SyntheticDataConfig(), rank=0, world_size=1, micro_batch_size=MICRO, seq_len=SEQ))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(batches)
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), b["labels"].view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    windows = [statistics.mean(times[i:i + WINDOW]) for i in range(WINDOW, steps - WINDOW + 1, WINDOW)]
    print(json.dumps({"window_step_s": windows}))


def run_baseline(steps: int, env: dict) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--baseline-worker", "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])["window_step_s"]


def run_trainer(steps: int, env: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "train", *overrides(steps, tmp)], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True)
        recs = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in recs if "tokens_per_s" in r][1:]  # first window = warm-up
    return [MICRO * SEQ / r["tokens_per_s"] for r in windows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-worker", action="store_true")
    args = ap.parse_args()
    if args.baseline_worker:
        return baseline_worker(args.steps)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    base, ours = [], []
    for r in range(args.rounds):
        base += run_baseline(args.steps, env)
        ours += run_trainer(args.steps, env)
        print(f"round {r}: best window so far: hand-written {1 / min(base):.2f} steps/s, "
              f"python -m train {1 / min(ours):.2f} steps/s", file=sys.stderr)
    # Background load only ever adds time, so the fastest 50-step window of each side is the
    # least noisy estimate of its cost; the medians are printed too.
    b, o = min(base), min(ours)
    print(json.dumps({"trainer_overhead_ratio": round(o / b - 1, 4),
                      "trainer_overhead_ratio_median": round(statistics.median(ours) / statistics.median(base) - 1, 4),
                      "trainer_steps_per_s": round(1 / o, 3), "baseline_steps_per_s": round(1 / b, 3),
                      "windows": len(base), "steps": args.steps, "rounds": args.rounds,
                      "omp_threads": env["OMP_NUM_THREADS"], "model": MODEL, "micro_batch": MICRO, "seq_len": SEQ}))


if __name__ == "__main__":
    main()
