"""Peak host memory of the offline export from sharded checkpoints (ZeRO-3 and FSDP, 2 ranks).

    python bench/export_memory.py [--layers 8 --hidden 512 --vocab 8192 --keep DIR]

Trains a Llama-style model (>= 8 decoder blocks) for one step under zero3 and fsdp with the
real trainer on 2 CPU ranks, then exports each checkpoint in a fresh child process while a
thread samples the child's RSS (psutil, every 5 ms). How memory is counted: the child
imports everything first (torch, transformers, deepspeed, safetensors, the exporter) and
reports its RSS as the baseline; the figure is (peak RSS - baseline) / fp32 model bytes, with
the anonymous part (RssAnon, not file-backed pages) alongside. Baseline in the same run: the
"naive" consolidation every engine offers (DeepSpeed zero_to_fp32's state dict / torch's
dcp_to_torch_save, then save_pretrained). Everything the export imports lazily (modeling code, DCP planner, generation config) is
imported before the baseline. The exporter runs with export.verify=false (verifying
reloads the whole model by definition) and, for reference, once with verify=true.
Ends with one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


def train(strategy: str, run_dir: Path, args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train", "model=tiny", f"strategy={strategy}", f"run.dir={run_dir}",
           f"model.num_hidden_layers={args.layers}", f"model.hidden_size={args.hidden}",
           f"model.intermediate_size={args.intermediate}", f"model.num_attention_heads={args.heads}",
           f"model.num_key_value_heads={args.heads}", f"data.vocab_size={args.vocab}",
           "trainer.seq_len=32", "trainer.micro_batch_size=1", "trainer.max_steps=1",
           "checkpoint.every_steps=1", "export=none", "tracking=none"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training {strategy} failed:\n{proc.stderr[-4000:]}")
    return run_dir / "checkpoints" / "step_00000001"


CHILD = r"""
import gc, json, os, sys, time
import torch, transformers, safetensors, deepspeed
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from train.export.config import ExportConfig
import torch.distributed.checkpoint, safetensors.torch
import train.export.dcp_reader, train.export.zero_reader, train.export.artifacts, train.export.verify
from train.export.hf_export import export_checkpoint, export_names
from train.export.artifacts import hf_config
transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
mode, ckpt, out = sys.argv[1:4]
cfg = hf_config(json.load(open(os.path.join(ckpt, "trainer_state.json")))["model_config"], "fp32")
with torch.device("meta"):  # import what building a model imports lazily: part of the baseline
    transformers.AutoModelForCausalLM.from_config(cfg)
transformers.GenerationConfig.from_model_config(cfg)
gc.collect()
print("BASELINE", flush=True); sys.stdin.readline()
if mode in ("stream", "verify"):
    export_checkpoint(ckpt, out, ExportConfig(kind="hf", verify=mode == "verify"))
else:  # naive: the engine's own full consolidation, then save_pretrained
    if os.path.isdir(os.path.join(ckpt, "deepspeed")):
        sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "deepspeed"))
    else:
        dcp_to_torch_save(os.path.join(ckpt, "model"), out + ".pt")
        sd = torch.load(out + ".pt", weights_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    model.save_pretrained(out)
print("DONE", flush=True)
"""


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _wait_for(child: subprocess.Popen, marker: str) -> str:
    """Read the child's stdout (libraries print there too) until `marker` or EOF."""
    for line in child.stdout:
        if line.strip() == marker:
            return marker
    return ""


def measure(mode: str, ckpt: Path, out: Path) -> dict[str, float]:
    """Run one export child; returns baseline, peak RSS and peak RssAnon (bytes) and seconds."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(ckpt), str(out)], cwd=REPO, env=ENV,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _wait_for(child, "BASELINE")
    proc = psutil.Process(child.pid)
    base_rss, base_anon = proc.memory_info().rss, _status_kb(child.pid, "RssAnon")
    peak = {"rss": base_rss, "anon": base_anon}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak["rss"] = max(peak["rss"], proc.memory_info().rss)
                peak["anon"] = max(peak["anon"], _status_kb(child.pid, "RssAnon"))
            except (psutil.Error, FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    child.stdin.write("go\n")
    child.stdin.flush()
    done = _wait_for(child, "DONE")
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    child.wait()
    if done != "DONE" or child.returncode:
        sys.exit(f"{mode} export of {ckpt} failed (exit {child.returncode})")
    return {"baseline": base_rss, "peak_over_base": peak["rss"] - base_rss,
            "anon_over_base": peak["anon"] - base_anon, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--modes", default="stream,naive,verify", help="comma-separated subset")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints already under --keep")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="export_memory_"))
    h, i, v, n = args.hidden, args.intermediate, args.vocab, args.layers
    n_params = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    fp32 = 4 * n_params
    figures: dict[str, float] = {}
    details: dict[str, dict] = {}
    for strategy in ("zero3", "fsdp"):
        ckpt = work / strategy / "checkpoints" / "step_00000001"
        if not (args.reuse and ckpt.is_dir()):
            ckpt = train(strategy, work / strategy, args)
        for mode in args.modes.split(","):
            out = work / f"{strategy}-{mode}"
            if out.exists():
                shutil.rmtree(out)
            r = measure(mode, ckpt, out)
            details[f"{strategy}_{mode}"] = {k: round(val / 2**20, 1) if k != "seconds" else round(val, 2)
                                             for k, val in r.items()}
            figures[f"{strategy}_{mode}_peak_over_fp32"] = round(r["peak_over_base"] / fp32, 3)
            figures[f"{strategy}_{mode}_anon_over_fp32"] = round(r["anon_over_base"] / fp32, 3)
    ratios = {k: v for k, v in figures.items() if "stream" in k}
    ratios.update({k: v for k, v in figures.items() if "stream" not in k})
    print(json.dumps({**ratios, "fp32_model_mib": round(fp32 / 2**20, 1), "params": n_params,
                      "layers": n, "details_mib": details}))


if __name__ == "__main__":
    main()
