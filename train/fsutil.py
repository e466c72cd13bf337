"""Small file work shared by checkpoints and exports: durable writes (never a torn file under a final
name), and reading back files that may since hold any bytes (a clear error naming the file)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a sibling temporary file, fsync it, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnreadableFileError(ValueError):
    """A file the run reads back holds something other than what was written; names the file."""


def read_untrusted_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of a file written earlier, which may since hold any bytes or be a directory.

    Every failure is an UnreadableFileError naming `path` and saying what it holds instead.
    """
    path = Path(path)
    if path.is_dir():
        raise UnreadableFileError(f"{path} is a directory, not the {what} file that belongs there")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise UnreadableFileError(f"{path} is missing (the {what} file)") from exc
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {path} ({what}): {exc.strerror or exc}") from exc
    if not data.strip():
        raise UnreadableFileError(f"{path} is empty: the {what} file is truncated or was never written")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"{path} is not UTF-8 text (binary or corrupt {what}: byte "
                                  f"{data[exc.start]:#04x} at offset {exc.start})") from exc


def read_untrusted_json(path: Path, what: str = "file", kind: type = dict) -> Any:
    """read_untrusted_text, parsed as JSON whose top level must be a `kind` (a dict by default)."""
    import json

    text = read_untrusted_text(path, what)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UnreadableFileError(f"{path} is not valid JSON ({exc}): the {what} file is corrupt") from exc
    if not isinstance(value, kind):
        raise UnreadableFileError(f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} "
                                  f"a {what} file holds: it is corrupt or not this program's")
    return value
