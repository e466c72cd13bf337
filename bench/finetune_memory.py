"""Full fine-tuning against LoRA (r=16) on the same ~100M-parameter Llama, on CPU.

    python bench/finetune_memory.py [--layers 12 --hidden 768 --intermediate 2560 --vocab 8192 --steps 4]

Runs the real trainer (`python -m train`, strategy=ddp, one process) twice on the same model
built from config and the same synthetic data: adapter=none, then adapter=lora adapter.r=16
(every attention and MLP projection). Each run is its own process, so its peak host memory is
its own: the trainer's `mem_peak_gb` (ru_maxrss, the whole process, imports included). Step
time is the median `step_time_s` after the first step; checkpoint size is the final
checkpoint directory on disk; the trainable fraction is counted on a meta-device copy of the
model with peft's adapter applied. Ends with one JSON line, ratios first. Goals: LoRA peak
memory <= 0.5x of full fine-tuning, LoRA checkpoint <= 5% of the full one.
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
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


def model_args(a: argparse.Namespace) -> list[str]:
    return ["model=tiny", "model.name=bench100m", f"model.num_hidden_layers={a.layers}",
            f"model.hidden_size={a.hidden}", f"model.intermediate_size={a.intermediate}",
            f"model.num_attention_heads={a.heads}", f"model.num_key_value_heads={a.kv_heads}",
            f"data.vocab_size={a.vocab}"]


def run(adapter: list[str], run_dir: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "train", *model_args(a), *adapter, "strategy=ddp", f"run.dir={run_dir}",
           f"trainer.seq_len={a.seq_len}", "trainer.micro_batch_size=1", f"trainer.max_steps={a.steps}",
           "checkpoint.every_steps=0", "export=none", "tracking=none", "tracking.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(adapter) or 'full'} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    ckpt = run_dir / "checkpoints" / f"step_{a.steps:08d}"
    return {"peak_gb": max(r["mem_peak_gb"] for r in steps),
            "step_time_s": statistics.median(r["step_time_s"] for r in steps[1:]),
            "checkpoint_mb": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20,
            "final_loss": steps[-1]["loss"]}


def trainable_fraction(a: argparse.Namespace) -> tuple[int, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.adapters.config import AdapterConfig

    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**AdapterConfig(kind="lora", r=a.r).lora_config()))
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 12), ("hidden", 768), ("intermediate", 2560), ("heads", 12),
                          ("kv_heads", 4), ("vocab", 8192), ("seq_len", 128), ("steps", 4), ("r", 16)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    trainable, total = trainable_fraction(a)
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        full = run([], Path(tmp) / "full", a)
        lora = run(["adapter=lora", f"adapter.r={a.r}"], Path(tmp) / "lora", a)
    for name, r in (("full", full), ("lora", lora)):
        print(f"{name:5s} peak {r['peak_gb']:.2f} GB | step {r['step_time_s']:.2f} s | "
              f"checkpoint {r['checkpoint_mb']:.1f} MB | final loss {r['final_loss']:.3f}")
    result = {
        "lora_vs_full_peak_memory": round(lora["peak_gb"] / full["peak_gb"], 3),
        "lora_vs_full_checkpoint": round(lora["checkpoint_mb"] / full["checkpoint_mb"], 4),
        "lora_vs_full_step_time": round(lora["step_time_s"] / full["step_time_s"], 3),
        "trainable_fraction_lora": round(trainable / total, 5),
        "params": total, "lora_trainable_params": trainable,
        "full": {k: round(v, 3) for k, v in full.items()}, "lora": {k: round(v, 3) for k, v in lora.items()},
        "goals": {"peak_memory_ratio_max": 0.5, "checkpoint_ratio_max": 0.05},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
