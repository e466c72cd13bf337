"""Checkpoints that never lose work.

A checkpoint is written into `checkpoints/.tmp-step_N`, listed (file sizes) in
`trainer_state.json`, renamed to `step_N` when every rank has finished, and only then named
by `checkpoints/latest` (replaced atomically). Resume walks from `latest` back through older
checkpoints, skipping any that is partial or fails to load, with a warning naming it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from train import dist as d
from train.fsutil import atomic_write_text, fsync_dir

log = logging.getLogger("scaletrain.checkpoint")
STEP_RE = re.compile(r"^step_(\d{8})$")
# DeepSpeed's world-size-independent copy of a checkpoint, made next to deepspeed/ when resuming
# on another number of ranks.
UNIVERSAL = "deepspeed_universal"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    world_size: int = 1
    strategy: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: str | None = None
    config_digest: str = ""
    files: dict[str, int] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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
    name = step_dir_name(state.step)
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
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
    _fault_injection(state.step)
    if info.is_main:
        _publish(ckpt_root, tmp, final, state, config_yaml)
        _retain(ckpt_root, keep_last)
    d.barrier()
    return final


def _fault_injection(step: int) -> None:
    """Tests kill the job mid-write with SCALETRAIN_DEBUG_KILL_IN_SAVE=<step>: a real SIGKILL of
    every rank after the shards are written and before the checkpoint is published."""
    if os.environ.get("SCALETRAIN_DEBUG_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _publish(root: Path, tmp: Path, final: Path, state: TrainState, config_yaml: str) -> None:
    (tmp / "config.yaml").write_text(config_yaml)
    state.files = {str(p.relative_to(tmp)): p.stat().st_size
                   for p in sorted(tmp.rglob("*")) if p.is_file()}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(asdict(state), indent=1, default=str))
    if final.exists():  # the same step saved again (e.g. stop signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    fsync_dir(root)


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories, newest first (temporary ones never match)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)),
                  key=lambda p: p.name, reverse=True)


def _retain(root: Path, keep_last: int) -> None:
    valid = [p for p in complete_checkpoints(root) if check_checkpoint(p) is None]
    for old in valid[max(1, keep_last):]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_checkpoint(path: Path) -> str | None:
    """None when `path` is complete; otherwise what is wrong with it."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (incomplete write)"
    try:
        files = json.loads(state_file.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable trainer_state.json ({e})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    return None


def resume_candidates(root: Path) -> list[Path]:
    """Checkpoints to try, best first: `latest`, then older complete ones. Warns on every skip."""
    ordered = complete_checkpoints(root)
    latest_file = root / "latest"
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in ordered:
            ordered.remove(named)
            ordered.insert(0, named)
        else:
            log.warning("checkpoints/latest names %s, which does not exist; looking for older checkpoints", named)
    out = []
    for p in ordered:
        problem = check_checkpoint(p)
        if problem:
            log.warning("skipping checkpoint %s: %s", p, problem)
        else:
            out.append(p)
    return out


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))


def load_rank_files(path: Path, info: d.DistInfo, saved_world: int) -> tuple[dict, list[dict]]:
    """This rank's RNG state and the loader states to restore (own, or all ranks' if resharding)."""
    if saved_world == info.world_size:
        rng = torch.load(path / "rng" / f"rank_{info.rank:05d}.pt", weights_only=True)
        data = [torch.load(path / "data" / f"rank_{info.rank:05d}.pt", weights_only=True)]
    else:
        rng = torch.load(path / "rng" / f"rank_{min(info.rank, saved_world - 1):05d}.pt", weights_only=True)
        data = [torch.load(path / "data" / f"rank_{r:05d}.pt", weights_only=True) for r in range(saved_world)]
    return rng, data
