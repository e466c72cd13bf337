"""Publishing exports atomically, retention, and re-hashing a finished export against export.json.

An export is built under `.tmp-NAME-PID` next to its final name and renamed into place only
when complete and verified, so a kill at any moment leaves either the previous export or the
new one at NAME, never a partial directory. Replacing an existing NAME (the same step
exported again) swaps the two directories in one atomic renameat2(RENAME_EXCHANGE); where the
filesystem lacks it, NAME is moved to `.old-NAME-PID` first. `clean_stale` deletes the
`.tmp-` directories a killed exporter left and puts back an `.old-` one whose NAME is missing.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from data_pipeline.fsutil import file_sha256, fsync_dir
from train import faults
from train.checkpoint_layout import STEP_PREFIX, LayoutError, read_text

META_NAME = "export.json"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class ExportVerifyError(ValueError):
    """An export directory does not match its export.json."""


def list_files(root: Path) -> list[str]:
    """Relative paths of every file under `root` except export.json."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != META_NAME)


def hash_tree(root: Path, known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file under `root` except export.json;
    `known` digests (computed while writing) are taken as they are."""
    known = known or {}
    return {rel: {"sha256": known.get(rel) or file_sha256(root / rel), "size": (root / rel).stat().st_size}
            for rel in list_files(root)}


def temp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{os.getpid()}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def publish(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final`. An existing `final` is swapped out atomically where the
    filesystem can (RENAME_EXCHANGE), else moved to `.old-NAME-PID` first (clean_stale puts it
    back if a kill lands between the two renames)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    if final.exists() and _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp)
        return
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
        faults.hit("export.publish")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def clean_stale(parent: Path, name: str | None = None) -> list[str]:
    """Remove `.tmp-*` left by killed exports; put back an `.old-NAME-*` whose NAME is missing."""
    notes = []
    if not parent.is_dir():
        return notes
    for path in sorted(parent.iterdir()):
        match = re.match(r"^\.(tmp|old)-(.+)-(\d+)$", path.name)
        if not match or (name is not None and match.group(2) != name) or not path.is_dir():
            continue
        kind, target, pid = match.group(1), parent / match.group(2), int(match.group(3))
        if _alive(pid) and pid != os.getpid():
            continue
        if kind == "old" and not target.exists():
            os.rename(path, target)
            notes.append(f"restored {target} from {path.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed stale {path}")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(exports_dir: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` step_N exports (0 keeps all); returns the deleted dirs."""
    if keep_last <= 0 or not exports_dir.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in exports_dir.iterdir()
                   if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / META_NAME).is_file())
    doomed = [p for _, p in steps[:-keep_last]]
    for path in doomed:
        trash = path.parent / f".old-{path.name}-{os.getpid()}"
        os.rename(path, trash)  # gone from its final name at once; a kill here is cleaned later
        shutil.rmtree(trash)
    return doomed


def read_meta(export_dir: Path) -> dict[str, Any]:
    """export.json of a finished export, checked to be ours; LayoutError names what is wrong with it."""
    meta_path = Path(export_dir) / META_NAME
    if not meta_path.exists():
        raise LayoutError(f"{meta_path} is missing: {export_dir} is not a finished export")
    try:
        meta = json.loads(read_text(meta_path, limit=256 << 20))
    except ValueError as exc:
        raise LayoutError(f"{meta_path} is not valid JSON ({exc}): the export's record is corrupt") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or "format_version" not in meta or not isinstance(files, dict) or not all(
            _safe_rel(rel) and isinstance(info, dict) and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str) for rel, info in files.items()):
        raise LayoutError(f"{meta_path} is not an export.json written by scaletrain (no format_version, "
                          "or 'files' is not a mapping of relative path -> {sha256, size})")
    return meta


def _safe_rel(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def verify_dir(export_dir: str | Path) -> dict[str, Any]:
    """Re-hash every file listed in export.json; raise ExportVerifyError naming each bad file
    (LayoutError when export.json itself is missing, unreadable or not ours)."""
    root = Path(export_dir)
    listed = read_meta(root)["files"]
    problems = []
    for rel, info in sorted(listed.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != info["size"]:
            problems.append(f"{rel}: size {size} bytes, export.json says {info['size']} (truncated or altered)")
            continue
        digest = file_sha256(path)
        if digest != info["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}... does not match export.json "
                            f"{info['sha256'][:16]}... (file was modified)")
    unlisted = sorted(set(list_files(root)) - set(listed))
    if problems:
        raise ExportVerifyError(f"{root} failed verification:\n  - " + "\n  - ".join(problems))
    return {"files_checked": len(listed), "unlisted_files": unlisted}
