"""Checkpoints that never lose work (the layout itself lives in train/checkpoint_layout.py).

A checkpoint is written into `checkpoints/.tmp-step_N`, listed (file sizes) in
`trainer_state.json`, renamed to `step_N` when every rank has finished, and only then named
by `checkpoints/latest` (replaced atomically). Resume walks from `latest` back through older
checkpoints, skipping any that is partial or fails to load, with a warning naming it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_pipeline.fsutil import atomic_write_text, fsync_dir
from train import dist as d
from train import faults
from train.checkpoint_layout import (
    CONFIG_FILE,
    LATEST,
    STATE_FILE,
    TMP_PREFIX,
    LayoutError,
    check_checkpoint,
    complete_checkpoints,
    file_sizes,
    read_state,
    resume_candidates,
    step_dir_name,
    tmp_dir_name,
)

log = logging.getLogger("scaletrain.checkpoint")
__all__ = ["TrainState", "save_checkpoint", "load_train_state", "load_rank_files", "resume_candidates",
           "rng_state", "set_rng_state"]


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    world_size: int = 1
    strategy: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: str | None = None
    config_digest: str = ""
    adapter: dict[str, Any] | None = None
    """Adapter runs: kind, base_model path, base_fingerprint, lora_config (train/adapters/lora.py)."""
    files: dict[str, int] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_root: Path, state: TrainState, info: d.DistInfo,
                    save_native: Callable[[Path], None], loader_state: dict[str, Any],
                    config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank calls it; returns the final checkpoint directory."""
    final, tmp = ckpt_root / step_dir_name(state.step), ckpt_root / tmp_dir_name(state.step)
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("rng", "data"):
            (tmp / sub).mkdir(parents=True)
    d.barrier()
    save_native(tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank_{info.rank:05d}.pt")
    torch.save(loader_state, tmp / "data" / f"rank_{info.rank:05d}.pt")
    d.barrier()
    faults.hit("checkpoint.publish", state.step)
    if info.is_main:
        _publish(ckpt_root, tmp, final, state, config_yaml)
        _retain(ckpt_root, keep_last)
    d.barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path, state: TrainState, config_yaml: str) -> None:
    atomic_write_text(tmp / CONFIG_FILE, config_yaml)
    state.files = file_sizes(tmp)
    atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=1, default=str))
    if final.exists():  # the same step saved again (e.g. stop signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    fsync_dir(root)


def _retain(root: Path, keep_last: int) -> None:
    valid = [p for p in complete_checkpoints(root) if check_checkpoint(p) is None]
    for old in valid[max(1, keep_last):]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(TMP_PREFIX + "step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_train_state(path: Path) -> TrainState:
    """trainer_state.json as a TrainState; keys this version does not know are ignored."""
    raw = read_state(path)
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def load_rank_files(path: Path, info: d.DistInfo, saved_world: int) -> tuple[dict, list[dict]]:
    """This rank's RNG state and the loader states to restore (own, or all ranks' if resharding)."""
    def load(sub: str, rank: int) -> Any:
        f = path / sub / f"rank_{rank:05d}.pt"
        try:
            return torch.load(f, weights_only=True)
        except Exception as e:  # any bytes: a zip/pickle error of whatever kind
            raise LayoutError(f"{f} cannot be read ({type(e).__name__}: {e})") from None

    if saved_world == info.world_size:
        return load("rng", info.rank), [load("data", info.rank)]
    return load("rng", min(info.rank, saved_world - 1)), [load("data", r) for r in range(saved_world)]
