"""`python -m train.export checkpoint=RUN_DIR/checkpoints/step_N out=DIR` and `... verify=DIR`.

Overrides are Hydra's (root config conf/export_cmd.yaml, group export/), so every export.*
setting of training works here too: `export.dtype=fp32 export.gguf=[q8_0,q4_k_m] export.quality=true`.
Exit status: 0 done, 1 the export or its verification failed (NaN/inf weights included), 2 bad
arguments, an `out=` that is not an earlier export, or an unreadable checkpoint or export.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
USAGE = __doc__.split("\n\n")[0]


def compose(overrides: list[str]) -> dict[str, Any]:
    """The composed conf/export_cmd.yaml with `overrides`, as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="export_cmd", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def export_config(raw: dict[str, Any]) -> Any:
    """ExportConfig from the `export` section, every problem collected into one error."""
    from data_pipeline.schema import load
    from train.export.config import ExportConfig

    return load(ExportConfig, raw, prefix="export")


def default_out(checkpoint: Path) -> Path:
    from train.export.checkpoint_reader import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(checkpoint)
    return ckpt.parent.parent / "exports" / ckpt.name


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        raw = compose(argv)
    except Exception as exc:  # hydra's override errors name the bad key
        print(f"error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    if raw.get("verify"):
        return _verify(raw["verify"])
    if not raw.get("checkpoint"):
        print(f"error: checkpoint= is required (or verify=DIR)\n{USAGE}", file=sys.stderr)
        return 2
    return _export(raw)


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _export(raw: dict[str, Any]) -> int:
    from train.export.checkpoint_reader import CheckpointError
    from train.export.hf_export import export_checkpoint
    from train.export.verify import ExportVerificationError

    try:
        cfg = export_config(raw["export"])
        checkpoint = Path(raw["checkpoint"])
        out = Path(raw["out"]) if raw.get("out") else default_out(checkpoint)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _quiet_libraries()
    try:
        meta = export_checkpoint(checkpoint, out, cfg)
    except ExportVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verification = meta.get("verification") or {}
    summary = {"path": meta["path"], "step": meta["step"], "dtype": meta["dtype"],
               "files": len(meta["files"]), "verified": verification.get("passed"),
               "max_abs_diff": verification.get("max_abs_diff"),
               "gguf": [g["file"] for g in meta.get("gguf_files") or []] or None,
               "quality": ({r["format"]: round(r["delta_pct"], 3) for r in meta["quality"]["formats"]}
                           if meta.get("quality") else None),
               "export_time_s": meta["export_time_s"]}
    print(json.dumps(summary))
    return 0


def _verify(path: str) -> int:
    from train.checkpoint_layout import LayoutError
    from train.export.files import ExportVerifyError, verify_dir

    try:
        report = verify_dir(path)
    except ExportVerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(Path(path).absolute()), "ok": True, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
