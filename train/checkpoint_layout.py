"""The checkpoint directory layout: one home for its names and its completeness check.

    checkpoints/.tmp-step_00000100/   being written (never read)
    checkpoints/step_00000100/        complete: trainer_state.json lists every file and its size
    checkpoints/latest                names the newest complete checkpoint; written last, atomically

The trainer writes it (train/checkpoint.py), the exporter reads it (train/export/) and the
SLURM requeue check reads it (launch/finished.py). Torch-free and importing nothing else of
the project (xxhash for checksums). Every file here is read back as untrusted input: any bytes, a directory, a
missing file give a reason string or `LayoutError`, never a traceback.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger("scaletrain.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
"""RUN_DIR/checkpoints holds the step directories and `latest`."""
STEP_PREFIX = "step_"
"""step_00000100: a checkpoint's directory; exports (RUN_DIR/exports) are named the same way."""
STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{8}})$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
"""The weights and optimizer of DDP and FSDP (torch.distributed.checkpoint)."""
DEEPSPEED_DIR = "deepspeed"
"""The weights and optimizer of DeepSpeed ZeRO (engine.save_checkpoint, with its own `latest`)."""
STEP_PATH = f"RUN_DIR/{CHECKPOINTS_DIR}/{STEP_PREFIX}N"
"""How messages tell a user which directory to pass."""


class LayoutError(ValueError):
    """A checkpoint file that cannot be used; the message names it."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path | str) -> int | None:
    """The step a checkpoint directory (`step_00000100`) holds, or None for any other name."""
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_step_entry(name: str) -> bool:
    """A checkpoint directory's name, complete (step_N) or being written (.tmp-step_N)."""
    return STEP_RE.match(name.removeprefix(TMP_PREFIX)) is not None


def tmp_dir_name(step: int) -> str:
    return TMP_PREFIX + step_dir_name(step)


def read_text(path: Path, limit: int = 1 << 20) -> str:
    """A small text file the run wrote earlier, or LayoutError naming what is wrong with it."""
    try:
        if path.is_dir():
            raise LayoutError(f"{path} is a directory, expected a file")
        data = path.read_bytes()[:limit + 1]
    except OSError as e:
        raise LayoutError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise LayoutError(f"{path} is larger than {limit} bytes: not a file this trainer wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(f"{path} is not UTF-8 text (corrupt)") from None


def read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path` as a dict with at least step and files."""
    f = path / STATE_FILE
    if not f.exists():
        raise LayoutError(f"{f} is missing (incomplete write)")
    try:
        state = json.loads(read_text(f, limit=64 << 20))
    except json.JSONDecodeError as e:
        raise LayoutError(f"{f} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("files", {}), dict):
        raise LayoutError(f"{f} lacks an integer step or its file list: not written by this trainer")
    return state


def read_latest(root: Path) -> str | None:
    """The directory name `checkpoints/latest` points at, or None (warning) when unusable."""
    f = root / LATEST
    if not f.exists():
        return None
    try:
        name = read_text(f, limit=4096).strip()
    except LayoutError as e:
        log.warning("ignoring %s: %s", f, e)
        return None
    if not STEP_RE.match(name):
        log.warning("ignoring %s: it names %r, not a step_N checkpoint", f, name[:80])
        return None
    return name


def check_checkpoint(path: Path, verify: bool = False) -> str | None:
    """None when `path` is complete; otherwise what is wrong with it. With `verify`, also the
    checksums that `checkpoint.verify=true` recorded (when the checkpoint has them)."""
    try:
        state = read_state(path)
    except LayoutError as e:
        return str(e)
    for rel, size in state.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    sums = state.get("checksums")
    if verify and isinstance(sums, dict):
        return check_checksums(path, sums)
    return None


def file_checksum(path: Path, chunk: int = 1 << 22) -> str:
    """xxh3-64 of a file: fast enough to run over every checkpoint file on each save."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_checksums(path: Path, sums: dict[str, Any]) -> str | None:
    """None when every listed file of checkpoint `path` has its recorded checksum."""
    for rel, want in sums.items():
        try:
            got = file_checksum(path / rel)
        except OSError as e:
            return f"cannot read {path / rel} to verify it: {e.strerror or e}"
        if got != want:
            return f"file {path / rel} fails its checksum (xxh3 {got}, recorded {want}): corrupt"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories, newest first (temporary ones never match); not yet checked."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)),
                  key=lambda p: p.name, reverse=True)


def resume_candidates(root: Path) -> list[Path]:
    """Checkpoints to try, best first: `latest`, then older complete ones. Warns on every skip."""
    ordered = complete_checkpoints(root)
    name = read_latest(root)
    if name is not None:
        named = root / name
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


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under `path` and its size: what check_checkpoint verifies later."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
