"""Strategies built inside the test process, as the loop builds them, so a test can ask the engine
what it did: a real one-rank process group, the config composed from conf/ and validated."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from tests.helpers import compose_train, free_port, patched_environ

VOCAB = 256  # the synthetic data's vocabulary


@contextlib.contextmanager
def one_rank_group(device: str = "auto") -> Iterator:
    """`train.dist.init_distributed` on one rank (gloo on CPU, nccl on GPU: its own choice) with the
    variables torchrun would export; yields its DistInfo and restores the environment."""
    import torch.distributed as dist

    from train.dist import init_distributed

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with patched_environ(env):
        try:
            yield init_distributed(device, need_group=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def build(info, run_dir: Path, *overrides: str):
    """(plain model, strategy) for `python -m train model=tiny OVERRIDES`."""
    from train.config import load_config
    from train.model import build_model
    from train.strategies import build_strategy

    cfg = load_config(compose_train(["model=tiny", f"run.dir={run_dir}", *overrides]), world_size=1)
    model = build_model(cfg.model, VOCAB, cfg.trainer.seed)
    return model, build_strategy(model, cfg, info, 1)


def batch(device: torch.device, seq_len: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, seq_len + 1), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq_len).repeat(2, 1)}
    return {k: v.contiguous().to(device) for k, v in out.items()}


def train_here(overrides: list[str]):
    """`python -m train OVERRIDES` run in this process, on one rank: for the tests of what a run does
    from its checkpoints (which one it resumes, what it skips and says), where the process itself
    (its exit status, what it prints around a traceback) is not what is checked. It saves the
    trainer's start-up (a fresh interpreter importing torch, transformers and the engines: about
    4 CPU-s a run). Logs go to the caller's `caplog`; the signal handlers the run installs and the
    variables a process group would export are restored after it. Returns the final TrainState."""
    import signal

    from train.config import load_config
    from train.loop import train

    raw = compose_train(overrides)
    cfg = load_config(raw, world_size=1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        with patched_environ(env):
            return train(cfg, raw)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
