"""Test helpers shared by every test file: the repo, the tiny model args, running the real CLI
(single process or torchrun with 2 gloo ranks) and reading its results back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.fsutil import free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# Small and fast: the tiny model on 32-token sequences, constant LR unless a test says otherwise.
TINY = ["model=tiny", "trainer.seq_len=32", "trainer.log_every=1"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_SERVICE", None)  # an in-process wandb.init would make children attach to its core
    env.setdefault("HYDRA_FULL_ERROR", "1")
    env.update(extra)
    return env


def train_cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "train", *args]
    return [PY, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "train", *args]


def run_train(args: list[str], nproc: int = 1, timeout: float = 300, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(args, nproc), cwd=REPO, env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_train(args: list[str], nproc: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(args, nproc), cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_all(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and every descendant (torchrun starts its ranks in new sessions)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def wait_for(predicate, timeout: float = 120, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def logged_steps(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def save_tiny_llama(out: Path, seed: int = 7, vocab_size: int = 256) -> Path:
    """A tiny random Llama saved with save_pretrained: a local 'pretrained' base for model=hf_local."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return Path(out)
