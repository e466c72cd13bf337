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
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from data_pipeline.fsutil import atomic_write_text, fsync_dir
from train import dist as d
from train import faults
from train.checkpoint_layout import (
    CONFIG_FILE,
    LATEST,
    STATE_FILE,
    STEP_PREFIX,
    TMP_PREFIX,
    LayoutError,
    check_checkpoint,
    complete_checkpoints,
    file_checksum,
    file_sizes,
    read_latest,
    read_state,
    resume_candidates,
    step_dir_name,
    tmp_dir_name,
)

log = logging.getLogger("scaletrain.checkpoint")
__all__ = ["TrainState", "Checkpointer", "CheckpointWriteError", "describe_error", "load_train_state",
           "load_rank_files", "resume_candidates",
           "rng_state", "set_rng_state"]


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    """Real (non-pad) input tokens of every step so far, all ranks (padding is not counted)."""
    trained_tokens: int = 0
    """Tokens the loss was taken over (label != -100) so far, all ranks."""
    world_size: int = 1
    strategy: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: str | None = None
    config_digest: str = ""
    adapter: dict[str, Any] | None = None
    """Adapter runs: kind, base_model path, base_fingerprint, lora_config (train/adapters/lora.py)."""
    files: dict[str, int] = field(default_factory=dict)
    finite: bool = False
    """Every weight and optimizer tensor was checked finite before writing (absent = unchecked)."""
    checksums: dict[str, str] = field(default_factory=dict)
    """xxh3 of every file when checkpoint.verify=true."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """The training run (started fresh, then resumed any number of times) that wrote it: retention
    deletes only checkpoints of the run it is part of ("" = written before run ids were recorded)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk...); the message names path and bytes."""


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


@dataclass
class PendingSave:
    """A checkpoint whose engine state is still being written in the background."""

    tmp: Path
    final: Path
    state: TrainState
    futures: list[Future]
    done: bool = False


class Checkpointer:
    """Writes checkpoints under `root`, blocking or (where the engine can) asynchronously.

    Asynchronous saves block training only while the state is staged to host memory; the
    write goes on in background threads. The checkpoint becomes `step_N` and `latest` only
    once its write has completed, through the same rename as a blocking save; a failed write
    is reported and never published. At most one save is in flight: the next save, a stop and
    the end of training wait for it.
    """

    def __init__(self, root: Path, info: d.DistInfo, config_yaml: str, keep_last: int,
                 verify: bool = False) -> None:
        self.root, self.info, self.config_yaml, self.keep_last = root, info, config_yaml, keep_last
        self.verify = verify
        self.pending: PendingSave | None = None

    def save(self, state: TrainState, strategy: Any, loader_state: dict[str, Any], blocking: bool) -> Path:
        """Collective: every rank calls it; returns the final checkpoint directory (which exists
        once the save is complete: at once when blocking, after `wait` or `poll` otherwise).
        The caller has checked that every weight and optimizer tensor is finite."""
        self.wait()
        final, tmp = self.root / step_dir_name(state.step), self.root / tmp_dir_name(state.step)
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in ("rng", "data"):
                (tmp / sub).mkdir(parents=True)
        d.barrier()
        save_async = None if blocking else getattr(strategy, "save_async", None)
        futures, error = None, None
        try:
            futures = save_async(tmp) if save_async else strategy.save(tmp)
            faults.fail_enospc("checkpoint.enospc", state.step, tmp / "rng")
            torch.save(rng_state(), tmp / "rng" / f"rank_{self.info.rank:05d}.pt")
            torch.save(loader_state, tmp / "data" / f"rank_{self.info.rank:05d}.pt")
        except (Exception, CheckpointException) as e:  # OSError, torch's RuntimeError or DCP's wrapping one
            error = describe_error(e)
        # every rank's files are written (or, async, staged and being written), or all ranks stop
        if d.any_rank(error is not None, self.info.device):  # a tensor all-reduce, like the barrier it replaces
            message = _failure_message(self.root, tmp, error or "failed on another rank")
            d.barrier()
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(message)
        self.pending = PendingSave(tmp, final, dataclasses.replace(state, finite=True), list(futures or []))
        if futures:
            faults.hit("checkpoint.async_inflight", state.step)
        else:
            self.wait()
        return final

    def poll(self) -> None:
        """Publish a finished background save (rank 0 only, no collective: DCP's coordinator
        finishes its write only after every rank's data is written)."""
        p = self.pending
        if p is not None and self.info.is_main and not p.done and all(f.done() for f in p.futures):
            self._finish(p)

    def wait(self) -> None:
        """Collective: finish the save in flight, if any, and publish it."""
        if self.pending is not None:
            self._finish(self.pending)
            self.pending = None
        d.barrier()

    def _finish(self, p: PendingSave) -> None:
        if p.done:
            return
        p.done = True
        try:
            for f in p.futures:
                f.result()
        except (Exception, CheckpointException) as e:
            log.error("%s", _failure_message(self.root, p.tmp, describe_error(e)))
            if self.info.is_main:
                shutil.rmtree(p.tmp, ignore_errors=True)
            return
        if self.info.is_main:
            faults.hit("checkpoint.publish", p.state.step)
            if self.verify:  # right after the write, while the files are likely still in the page cache
                p.state.checksums = {rel: file_checksum(p.tmp / rel) for rel in file_sizes(p.tmp)}
            _publish(self.root, p.tmp, p.final, p.state, self.config_yaml)
            _retain(self.root, self.keep_last, p.state.run_id)


def describe_error(e: BaseException) -> str:
    """One line per failure (DCP wraps each rank's exception with its whole traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {describe_error(exc)}" for r, (exc, _) in e.failures.items())
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _failure_message(root: Path, tmp: Path, error: str) -> str:
    """What a failed checkpoint write tells the user: the path, the bytes a checkpoint needs
    (the newest complete one's size) and the bytes free; `latest` is never touched."""
    partial = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    previous = next((p for p in complete_checkpoints(root) if check_checkpoint(p) is None), None)
    needed = sum(read_state(previous).get("files", {}).values()) if previous else None
    free = shutil.disk_usage(root).free
    need = f"about {needed} bytes (the size of {previous.name})" if needed else f"more than {partial} bytes"
    return (f"could not write checkpoint {tmp} ({error}). A checkpoint needs {need}; {free} bytes are free "
            f"on the filesystem of {root}. The partial directory is removed and {root / LATEST} still names "
            f"{read_latest(root) or 'no checkpoint'}: free space (or lower checkpoint.keep_last) and resume")


def _publish(root: Path, tmp: Path, final: Path, state: TrainState, config_yaml: str) -> None:
    atomic_write_text(tmp / CONFIG_FILE, config_yaml)
    state.files = file_sizes(tmp)
    if state.checksums:
        state.checksums[CONFIG_FILE] = file_checksum(tmp / CONFIG_FILE)
    atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=1, default=str))
    if final.exists():  # the same step saved again (e.g. stop signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    fsync_dir(root)


def _retain(root: Path, keep_last: int, run_id: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints, and always the newest finite one. Only
    checkpoints of run `run_id` (None: any) are counted and deleted: another run's never are."""
    valid = [p for p in complete_checkpoints(root) if check_checkpoint(p) is None
             and (run_id is None or read_state(p).get("run_id", "") == run_id)]
    newest_finite = next((p for p in valid if read_state(p).get("finite") is True), None)
    for old in valid[max(1, keep_last):]:
        if old != newest_finite:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}{STEP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_train_state(path: Path) -> TrainState:
    """trainer_state.json as a TrainState; keys this version does not know are ignored."""
    raw = {"run_id": "", **read_state(path)}  # no run_id: written before run ids were recorded
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
