"""Test helpers shared by every test file: the repo, the tiny model args, running the real CLI
(single process or torchrun with 2 gloo ranks) and reading its results back."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.fsutil import free_port  # noqa: F401  (re-exported for tests)
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# Small and fast: the tiny model on 32-token sequences, constant LR unless a test says otherwise.
TINY = ["model=tiny", "trainer.seq_len=32", "trainer.log_every=1"]
# Constant LR and a global batch of 4 (2 ranks x micro 2, or 1 rank x micro 2 x accumulation 2): a
# run's curve does not depend on max_steps, so runs of different lengths compare step by step.
CONSTANT_B4 = ("schedule=constant", "trainer.micro_batch_size=2", "trainer.global_batch_size=4")


def compose_train(overrides: list[str]) -> dict:
    """The resolved config `python -m train OVERRIDES` would see (Hydra compose of conf/train.yaml)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    """`env` set in this process's environment for the block; the previous values restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    proc = run_reporting_hangs(train_cmd(args, nproc), timeout=timeout, cwd=REPO, env=env or child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


class TrainProcess(subprocess.Popen):
    """A trainer started in the background whose output (stdout and stderr) goes to an unlinked
    temporary file, not a pipe: a test that waits on the ranks before reading would otherwise
    stop them once 64 KiB of log lines fill the pipe (rank 0 blocks in write, the others in the
    step's collective). `stdout.read()` returns what was written so far; `communicate` waits first."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        fd, path = tempfile.mkstemp(prefix="scaletrain-test-", suffix=".log")
        try:
            super().__init__(cmd, cwd=REPO, env=env, stdout=fd, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            self.stdout = open(path, encoding="utf-8", errors="replace")
        finally:
            os.close(fd)
            os.unlink(path)

    def communicate(self, input=None, timeout: float | None = None) -> tuple[str, None]:
        try:
            self.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            dumped = dump_stacks(_train_args(self.args))
            out = self.stdout.read()
            raise AssertionError(f"still running after {timeout:g} s; its output ends:\n{out[-6000:]}\n"
                                 f"stacks of its {dumped} rank(s) (SIGUSR2):\n{stacks(out)}") from None
        return self.stdout.read(), None


def _is_rank(cmd: list[str]) -> bool:
    """`python ... -m train ...` (a rank), not a launcher whose arguments name the module."""
    if not cmd or not Path(cmd[0]).name.startswith("python") or "-m" not in cmd:
        return False
    i = cmd.index("-m")
    return cmd[i + 1:i + 2] == ["train"]


def _train_args(cmd: list[str]) -> list[str]:
    """The trainer's overrides in a launcher's command line (what follows `-m train`)."""
    return cmd[cmd.index("train") + 1:] if "train" in cmd else cmd


def dump_stacks(args: list[str], wait_s: float = 3.0) -> int:
    """SIGUSR2 to every running trainer rank started with exactly these `args` (a run.dir among
    them makes them unique): each prints its threads' stacks to its stderr (train/signals.py).
    Returns how many were signalled."""
    import psutil

    n = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if _is_rank(cmd) and cmd[-len(args):] == list(args):
            try:
                p.send_signal(signal.SIGUSR2)
                n += 1
            except psutil.NoSuchProcess:
                pass
    if n:
        time.sleep(wait_s)
    return n


def stacks(text: str) -> str:
    """The thread stacks that faulthandler printed into `text` (a rank's output, log lines between)."""
    keep = [line for line in text.splitlines()
            if re.match(r"(Current thread|Thread) 0x[0-9a-f]+ |  File \"|Stack \(most recent", line)]
    return "\n".join(keep) or "(none printed)"


def run_reporting_hangs(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`, except that a
    command still running at the timeout first has its trainer ranks print their stacks, and the
    AssertionError carries the tail of what it printed (where a hang waits, not only that it did)."""
    args = _train_args(cmd)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dumped = dump_stacks(args)
            kill_all(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(cmd[:6])} ... still running after {timeout:g} s; its output ends:\n"
                                 f"{out[-3000:]}\n{err[-6000:]}\nstacks of its {dumped} rank(s) (SIGUSR2):\n"
                                 f"{stacks(out + err)}") from None
        except BaseException:  # pytest-timeout's, Ctrl-C: leave no process behind (as subprocess.run)
            dump_stacks(args, wait_s=0.5)
            kill_all(proc)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start_train(args: list[str], nproc: int = 1, env: dict[str, str] | None = None) -> TrainProcess:
    return TrainProcess(train_cmd(args, nproc), env or child_env())


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
    """step -> training loss, as the run logged it."""
    return {rec["step"]: rec["loss"] for rec in read_metrics(run_dir) if "loss" in rec}


def logged_steps(run_dir: Path) -> int:
    if not (Path(run_dir) / "metrics.jsonl").exists():
        return 0
    return max((rec.get("step", 0) for rec in read_metrics(run_dir)), default=0)


def save_tiny_llama(out: Path, seed: int = 7, vocab_size: int = 256) -> Path:
    """A tiny random Llama saved with save_pretrained: a local 'pretrained' base for model=hf_local."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return Path(out)
