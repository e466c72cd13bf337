"""Peak host memory of one training step at a 128k vocabulary: trainer.loss=plain vs chunked.

    python bench/loss_memory.py [--vocab 128256 --batch 2 --seq 512 --hidden 64 --layers 2]

Each loss kind runs in a fresh child process: build the model (train.model.build_model) and
AdamW, run one step without measuring (so lazily allocated state exists), then measure a
second full step (forward, backward, optimizer step) while a thread samples RSS (psutil,
every 2 ms). The figure is the step's peak RSS above the RSS just before it. The logits'
share is what one [tokens, vocab] fp32 tensor takes; the goal is chunked's step peak <= 0.5x
plain's. Ends with one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def child(kind: str, args: argparse.Namespace) -> None:
    import psutil
    import torch

    from train.config import ModelConfig
    from train.loss import lm_loss
    from train.model import build_model

    model = build_model(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers),
                        None, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": torch.arange(args.seq).repeat(args.batch, 1)}

    def step() -> float:
        loss = lm_loss(model, batch, kind)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    before = proc.memory_info().rss
    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    print(json.dumps({"kind": kind, "step_peak_bytes": max(peak[0], proc.memory_info().rss) - before,
                      "loss": loss, "step_s": round(seconds, 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--child", choices=["plain", "chunked"])
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    rows = {}
    for kind in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--child", kind, *sys.argv[1:]]
        out = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, check=True).stdout
        rows[kind] = json.loads(out.strip().splitlines()[-1])
    logits = args.batch * args.seq * args.vocab * 4
    mib = 2**20
    print(json.dumps({
        "chunked_over_plain": round(rows["chunked"]["step_peak_bytes"] / rows["plain"]["step_peak_bytes"], 3),
        "chunked_over_logits_fp32": round(rows["chunked"]["step_peak_bytes"] / logits, 3),
        "plain_over_logits_fp32": round(rows["plain"]["step_peak_bytes"] / logits, 3),
        "plain_step_peak_mib": round(rows["plain"]["step_peak_bytes"] / mib, 1),
        "chunked_step_peak_mib": round(rows["chunked"]["step_peak_bytes"] / mib, 1),
        "logits_fp32_mib": round(logits / mib, 1),
        "loss_plain": rows["plain"]["loss"], "loss_chunked": rows["chunked"]["loss"],
        "step_s_plain": rows["plain"]["step_s"], "step_s_chunked": rows["chunked"]["step_s"],
        "vocab": args.vocab, "tokens": args.batch * args.seq}))


if __name__ == "__main__":
    main()
