"""Durable writes: never a torn file under a final name.

The one home for temp-then-rename writes of every package (checkpoints, exports, manifests,
metrics, reports, job scripts). It lives in data_pipeline, the lowest layer, because
data_pipeline imports nothing of train.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call `write(tmp)` for a sibling temporary file, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), mode)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards and exports can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def free_port() -> int:
    """A TCP port free on localhost now (for a single-process group's store, tests, servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
