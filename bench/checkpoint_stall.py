"""How long does a checkpoint stop training: blocking save against `checkpoint.async=true`?

Both runs train the same ~100M-parameter Llama (built from config, synthetic data, one CPU
process, DDP strategy) and checkpoint every `--every` steps. The stall is the trainer's own
`checkpoint_time_s` record: for a blocking save the whole write (DCP model + AdamW state,
RNG and loader state, publish); for an async save the time to stage the state in host memory
and hand it to the background writer. The final checkpoint is blocking in both (the run waits
for it), so only the periodic ones are compared. Prints one JSON line, ratio first.

    .venv/bin/python bench/checkpoint_stall.py [--steps 7] [--every 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=256)
VOCAB = 32000


def stalls(run_async: bool, steps: int, every: int) -> tuple[list[float], int]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "train", "model=tiny", *[f"model.{k}={v}" for k, v in MODEL.items()],
                f"data.vocab_size={VOCAB}", "trainer.micro_batch_size=1", "trainer.seq_len=64",
                f"trainer.max_steps={steps}", "trainer.log_every=1000", f"checkpoint.every_steps={every}",
                "checkpoint.keep_last=1", f"checkpoint.async={str(run_async).lower()}", "tracking.progress=false",
                f"run.dir={tmp}/run"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, text=True)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        times = [r["checkpoint_time_s"] for r in recs if "checkpoint_time_s" in r and r["step"] < steps]
        size = sum(p.stat().st_size for p in (Path(tmp) / "run" / "checkpoints").rglob("*") if p.is_file())
        return times, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--every", type=int, default=2)
    a = ap.parse_args()
    sync, size = stalls(False, a.steps, a.every)
    async_, _ = stalls(True, a.steps, a.every)
    s, b = statistics.median(sync), statistics.median(async_)
    print(json.dumps({"async_over_sync_stall": round(b / s, 4), "sync_stall_s": round(s, 3),
                      "async_stall_s": round(b, 3), "checkpoint_bytes": size, "saves_compared": len(sync),
                      "goal": "async stall <= 0.10 x sync"}))


if __name__ == "__main__":
    main()
