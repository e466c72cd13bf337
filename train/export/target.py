"""Where an export may be written: never over files that are not an earlier export.

Publishing replaces the directory at `out` (files.publish), so `out` must be new, empty, or an
earlier export (its export.json is scaletrain's). It must never lie inside a run's checkpoints/
(or inside a checkpoint), where replacing or even creating directories would corrupt the
checkpoints the export is made from. The training hook's RUN_DIR/exports/step_N obeys the same rule.
"""
from __future__ import annotations

from pathlib import Path

from train.checkpoint_layout import CHECKPOINTS_DIR, LATEST, STATE_FILE, LayoutError, is_step_entry
from train.export.files import META_NAME, read_meta


class ExportTargetError(ValueError):
    """`out=` names a directory an export must not replace; nothing was written."""


def check_target(out: Path, checkpoint: Path) -> None:
    """Raise ExportTargetError unless publishing an export at `out` can lose nothing."""
    out = Path(out).absolute()
    real, ckpt = out.resolve(), Path(checkpoint).resolve()
    inside = _checkpoints_ancestor(real)
    if inside is not None or ckpt.is_relative_to(real):
        where = inside or ckpt
        raise ExportTargetError(
            f"out={out} is inside the checkpoint directory {where} (or contains the checkpoint): an export "
            "there would replace or mix with checkpoints. Use out=RUN_DIR/exports/step_N (the default) "
            "or a directory outside checkpoints/")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportTargetError(f"out={out} is a file, not a directory: choose a new directory")
    if not any(out.iterdir()):
        return
    if not (out / META_NAME).exists():
        raise ExportTargetError(
            f"out={out} is a non-empty directory that is not an earlier export (it has no {META_NAME}): "
            "exporting would replace its contents. Choose a new or empty directory, or remove it yourself")
    try:
        read_meta(out)
    except LayoutError as exc:
        raise ExportTargetError(f"out={out} is not an earlier export that may be replaced: {exc}") from exc


def _checkpoints_ancestor(path: Path) -> Path | None:
    """The checkpoint or run checkpoints/ directory `path` is in (or is), if any."""
    for anc in (path, *path.parents):
        if (anc / STATE_FILE).is_file():
            return anc
        if anc.name == CHECKPOINTS_DIR and anc.is_dir() and (
                (anc / LATEST).exists() or any(is_step_entry(p.name) for p in anc.iterdir())):
            return anc
    return None
