"""Example export hooks: copy each finished export into a model registry directory.

Enable with (conf/export/*.yaml or the command line):

    export:
      hooks:
        - _target_: train.export.hooks_example.copy_to   # factory: called once at start-up
          dest: /shared/registry/my-model

`copy_to(dest)` returns the hook; the hook receives (export_dir, metadata) after the export
is verified and published, and copies it to DEST/step_N atomically (temp name, then rename),
then re-verifies the copy's hashes so a registry never holds a corrupt model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from train.export.files import verify_dir


def copy_to(dest: str) -> Callable[[Path, dict[str, Any]], Path]:
    """Factory: a hook that copies each export to DEST/<export dir name>."""
    root = Path(dest).expanduser()

    def hook(export_dir: Path, metadata: dict[str, Any]) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        final = root / Path(export_dir).name
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(export_dir, tmp)
        verify_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    return hook


def log_export(export_dir: Path, metadata: dict[str, Any], prefix: str = "exported") -> None:
    """A plain-function hook (use with `_partial_: true` or as a dotted string)."""
    print(f"{prefix}: step {metadata.get('step')} -> {export_dir}", flush=True)
