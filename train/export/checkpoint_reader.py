"""Open a saved training checkpoint of any strategy and read its fp32 weights one tensor at a time.

The checkpoint layout is the trainer's contract (DESIGN.md, "Checkpoints"): trainer_state.json,
config.yaml, and either model/ (torch.distributed.checkpoint, DDP and FSDP) or deepspeed/
(DeepSpeed ZeRO-1/2/3, with or without offload). Readers never materialise the whole model:
`WeightSource.load(name)` returns one full tensor and the caller writes it out before asking
for the next.
"""
from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from train.fsutil import UnreadableFileError, read_untrusted_json, read_untrusted_text

# Segments that wrappers insert into parameter names; the export uses plain Hugging Face names.
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file and the fix."""


class WeightSource(Protocol):
    """Full (unsharded) tensors of a checkpoint, materialised one at a time."""

    def names(self) -> list[str]:
        """Hugging Face parameter/buffer names, in checkpoint order."""

    def shape(self, name: str) -> torch.Size: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def load(self, name: str) -> torch.Tensor:
        """The full tensor `name` (fp32 for floating weights); the caller owns it."""


@dataclass
class Checkpoint:
    """A complete checkpoint directory and what trainer_state.json says about it."""

    path: Path
    state: dict[str, Any]
    weights: WeightSource

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def strategy(self) -> dict[str, Any]:
        return dict(self.state.get("strategy") or {})

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.state["model_config"])

    @property
    def tokenizer_dir(self) -> str | None:
        return self.state.get("tokenizer_dir")


def canonical_name(key: str) -> str:
    """`module.model.layers.0...` (DDP), `_orig_mod.` (compile) ... -> the Hugging Face name."""
    for seg in _WRAPPER_SEGMENTS:
        if key.startswith(seg):
            key = key[len(seg):]
        key = key.replace("." + seg, ".")
    return key


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept step_N, a checkpoints/ dir or a run dir (the last two follow their `latest` file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint={str(path)!r} does not exist: pass RUN_DIR/checkpoints/step_N")
    for base in (p, p / "checkpoints"):
        latest = base / "latest"
        if not (p / "trainer_state.json").exists() and latest.is_file():
            target = base / _read_latest(latest)
            if target.is_dir():
                return target
            raise CheckpointError(f"{latest} names {target.name!r}, which does not exist: pass "
                                  f"RUN_DIR/checkpoints/step_N explicitly")
    if p.name.startswith(".tmp-"):
        raise CheckpointError(f"{p} is an incomplete checkpoint (still being written, or its writer "
                              "was killed): pass a complete RUN_DIR/checkpoints/step_N")
    return p


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read trainer_state.json and pick the weight reader for the strategy that wrote `path`."""
    p = resolve_checkpoint_dir(path)
    state_file = p / "trainer_state.json"
    if not state_file.exists():
        raise CheckpointError(f"{p} has no trainer_state.json: it is not a complete checkpoint; "
                              "pass RUN_DIR/checkpoints/step_N (written by `python -m train`)")
    try:
        state = read_untrusted_json(state_file, "trainer_state.json")
    except UnreadableFileError as exc:
        raise CheckpointError(f"{exc}; export another checkpoint") from exc
    missing = [k for k in ("step", "model_config") if k not in state]
    if missing or not isinstance(state["step"], int) or not isinstance(state["model_config"], dict):
        raise CheckpointError(f"{state_file} lacks {missing or 'an integer step and a model_config mapping'}: "
                              "it was not written by this trainer, or is corrupt")
    check_file_sizes(p, state.get("files"), state_file)
    if (p / "deepspeed").is_dir():
        from train.export.zero_reader import ZeroWeights

        weights: WeightSource = ZeroWeights(p / "deepspeed")
    elif (p / "model").is_dir():
        from train.export.dcp_reader import DCPWeights

        weights = DCPWeights(p / "model")
    else:
        raise CheckpointError(f"{p} has neither model/ (DDP/FSDP) nor deepspeed/ (ZeRO): "
                              "no weights to export")
    return Checkpoint(path=p.resolve(), state=state, weights=weights)


def _read_latest(latest: Path) -> str:
    try:
        name = read_untrusted_text(latest, "checkpoints/latest").strip()
    except UnreadableFileError as exc:
        raise CheckpointError(f"{exc}; pass RUN_DIR/checkpoints/step_N explicitly") from exc
    if not name or "/" in name or name in (".", ".."):
        raise CheckpointError(f"{latest} holds {name[:80]!r}, not a checkpoint name: pass "
                              "RUN_DIR/checkpoints/step_N explicitly")
    return name


def check_file_sizes(path: Path, files: Any, state_file: Path) -> None:
    """Every file trainer_state.json lists exists with the size it records (a truncated shard is
    named here, not left to surface as a reader's traceback)."""
    if files is None:
        return
    if not isinstance(files, dict):
        raise CheckpointError(f"{state_file}: 'files' is not a mapping of file -> bytes: the file is corrupt")
    for rel, size in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: file {rel} listed in trainer_state.json is missing: "
                                  "the checkpoint is incomplete; export another checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, trainer_state.json records {size}: "
                                  "the file is truncated or corrupt; export another checkpoint")


_libc = None


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of memory-mapped (read-only) tensors.

    Reading a tensor slice from a torch.load(mmap=True) file maps its pages into this process;
    without this they would pile up until the whole file is resident, which is exactly what a
    low-memory export must avoid. MADV_DONTNEED on a clean file mapping only unmaps: the next
    read faults the data back in from the file (or the page cache).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for t in tensors:
        nbytes = t.untyped_storage().nbytes()
        if nbytes < page:
            continue
        start = t.untyped_storage().data_ptr()
        aligned = (start + page - 1) // page * page
        length = (start + nbytes - aligned) // page * page
        if length > 0:
            _libc.madvise(aligned, length, 4)  # MADV_DONTNEED
