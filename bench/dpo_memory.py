"""DPO's cost against SFT on the same model and sequence lengths: peak host memory and step time.

    python bench/dpo_memory.py [--hidden 512 --layers 8 --seq-len 256 --pairs 4 --steps 6] [--smoke]

One tiny-tokenizer corpus of preference pairs (prepare mode=preference) and one local Llama
(model=hf_local) of the given size; each case is a real `python -m train` process on CPU, so the
peak is the process's own (metrics.jsonl `mem_peak_gb`, ru_maxrss):

  sft        objective=lm on synthetic rows, 2 x pairs rows per micro-batch (the same sequences)
  dpo_model  objective=dpo objective.reference=model (a frozen copy of the model)
  dpo_pre    objective=dpo objective.reference=precompute (no reference model while training)
  sft_lora   adapter=lora, objective=lm
  dpo_lora   adapter=lora, objective=dpo (reference=auto: the adapter disabled)

Step time is the median of the steps after the first. Ends with one JSON line, ratios first.
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
sys.path.insert(0, str(REPO))

from tests.support.data import build_llama3_tokenizer, write_jsonl  # noqa: E402
from tests.support.pairs import prepare_pairs, sample_pairs  # noqa: E402


def run(args: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "train", *args, f"run.dir={run_dir}", "tracking.progress=false",
                           "checkpoint.at_end=false"], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    return {"peak_gb": max(r["mem_peak_gb"] for r in steps),
            "step_s": statistics.median(r["step_time_s"] for r in steps[1:] or steps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps (for the test suite)")
    a = ap.parse_args()
    if a.smoke:
        a.hidden, a.layers, a.seq_len, a.pairs, a.steps = 32, 2, 96, 2, 2
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        root = Path(tmp)
        tok = build_llama3_tokenizer(root / "model")
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                                     num_hidden_layers=a.layers, num_attention_heads=8 if a.hidden >= 64 else 4,
                                     num_key_value_heads=4 if a.hidden >= 64 else 2)).save_pretrained(root / "model")
        write_jsonl(root / "pairs.jsonl", sample_pairs(8 * a.pairs))
        prepare_pairs(root / "data", root / "pairs.jsonl", root / "model",
                      **{"split.val_fraction": 0.0, "preference.max_len": a.seq_len})
        common = ["model=hf_local", f"model.path={root / 'model'}", f"trainer.seq_len={a.seq_len}",
                  f"trainer.max_steps={a.steps}", "schedule=constant"]
        sft = [*common, "data=synthetic", f"trainer.micro_batch_size={2 * a.pairs}"]
        dpo = [*common, "data=webdataset", f"data.urls={root / 'data'}", "objective=dpo",
               f"trainer.micro_batch_size={a.pairs}"]
        cases = {"sft": sft, "dpo_model": [*dpo, "objective.reference=model"],
                 "dpo_pre": [*dpo, "objective.reference=precompute"], "sft_lora": [*sft, "adapter=lora"],
                 "dpo_lora": [*dpo, "adapter=lora"]}
        got = {name: run(args, root / name) for name, args in cases.items()}
    ratio = {"mem_dpo_lora_vs_sft_lora": got["dpo_lora"]["peak_gb"] / got["sft_lora"]["peak_gb"],
             "mem_dpo_pre_vs_sft": got["dpo_pre"]["peak_gb"] / got["sft"]["peak_gb"],
             "mem_dpo_model_vs_sft": got["dpo_model"]["peak_gb"] / got["sft"]["peak_gb"],
             "time_dpo_lora_vs_sft_lora": got["dpo_lora"]["step_s"] / got["sft_lora"]["step_s"],
             "time_dpo_pre_vs_sft": got["dpo_pre"]["step_s"] / got["sft"]["step_s"],
             "time_dpo_model_vs_sft": got["dpo_model"]["step_s"] / got["sft"]["step_s"]}
    print(json.dumps({**{k: round(v, 3) for k, v in ratio.items()},
                      **{f"{n}_{k}": round(v, 4) for n, r in got.items() for k, v in r.items()},
                      "hidden": a.hidden, "layers": a.layers, "seq_len": a.seq_len, "pairs": a.pairs}))


if __name__ == "__main__":
    main()
