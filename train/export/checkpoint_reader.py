"""Open a saved training checkpoint of any strategy and read its fp32 weights one tensor at a time.

The checkpoint layout is the trainer's contract (DESIGN.md, "Checkpoints"): trainer_state.json,
config.yaml, and either model/ (torch.distributed.checkpoint, DDP and FSDP) or deepspeed/
(DeepSpeed ZeRO-1/2/3, with or without offload). Readers never materialise the whole model:
`WeightSource.load(name)` returns one full tensor and the caller writes it out before asking
for the next.
"""
from __future__ import annotations

import ctypes
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

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
            target = base / latest.read_text().strip()
            if target.is_dir():
                return target
    if p.name.startswith(".tmp-"):
        raise CheckpointError(f"{p} is an incomplete checkpoint (still being written, or its writer "
                              "was killed): pass a complete RUN_DIR/checkpoints/step_N")
    return p


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read trainer_state.json and pick the weight reader for the strategy that wrote `path`."""
    p = resolve_checkpoint_dir(path)
    state_file = p / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{p} has no trainer_state.json: it is not a complete checkpoint; "
                              "pass RUN_DIR/checkpoints/step_N (written by `python -m train`)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_file} is not valid JSON ({exc}): the checkpoint is corrupt") from exc
    missing = [k for k in ("step", "model_config") if k not in state]
    if missing:
        raise CheckpointError(f"{state_file} lacks {missing}: it was not written by this trainer")
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
