"""The export hook the training loop calls: RUN_DIR/exports/step_N, retention, user hooks.

Built once at start-up on every rank (user hook targets are resolved there, so a bad
`_target_` fails before any training); called on rank 0 after the checkpoint of that step is
complete. The loop measures the call as export_time_s.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from train.checkpoint_layout import step_dir_name
from train.export.config import ExportConfig, hook_problems, hook_target
from train.export.files import prune

log = logging.getLogger(__name__)
UserHook = Callable[[Path, dict], Any]


def build_user_hooks(specs: list[Any]) -> list[tuple[str, UserHook]]:
    """Resolve export.hooks entries into callables hook(export_dir, metadata).

    `pkg.mod.fn` (a string) or `{_target_: pkg.mod.fn, _partial_: true, key: value}` is called
    as fn(export_dir, metadata, key=value); `{_target_: pkg.mod.factory, key: value}` calls
    factory(key=value) once, here, and the callable it returns is the hook.
    """
    problems = hook_problems(specs)
    if problems:
        raise ValueError("invalid export.hooks:\n  - " + "\n  - ".join(problems))
    from hydra.utils import get_method, instantiate

    hooks = []
    for i, spec in enumerate(specs):
        target = hook_target(spec)
        if isinstance(spec, str):
            hook = get_method(spec)
        else:
            hook = instantiate(dict(spec))
        if not callable(hook):
            raise ValueError(f"export.hooks[{i}]._target_={target!r} returned {type(hook).__name__}, "
                             "not a callable: return hook(export_dir, metadata) from the factory or "
                             "set _partial_: true")
        hooks.append((f"export.hooks[{i}] ({target})", hook))
    return hooks


class ExportHook:
    """Serving exports during training; see `__call__` and README "Export" for the loop's side."""

    def __init__(self, cfg: ExportConfig, run_dir: str | Path, rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.exports_dir = Path(run_dir) / "exports"
        # targets were imported (validated) by load_config on every rank; factories run on rank 0,
        # the only rank that exports
        self.user_hooks = build_user_hooks(cfg.hooks) if cfg.kind == "hf" and rank == 0 else []

    @property
    def enabled(self) -> bool:
        return self.cfg.kind == "hf"

    def due(self, step: int, final: bool = False) -> bool:
        """Export at this step? every export.every_steps steps, and at the end of training."""
        if not self.enabled:
            return False
        return final or (self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0)

    def verify_batch(self, vocab_size: int, max_positions: int | None = None) -> torch.LongTensor:
        """Token ids the loop runs the live model on (all ranks) to get `reference_logits`."""
        from train.export.verify import verify_batch

        return verify_batch(vocab_size, max_positions)

    def out_dir(self, step: int) -> Path:
        return self.exports_dir / step_dir_name(step)  # named as the checkpoint it comes from

    def __call__(self, step: int, checkpoint_dir: str | Path, reference_logits: torch.Tensor | None = None,
                 reference_precision: str = "fp32") -> dict[str, Any]:
        """Export the complete checkpoint of `step` (rank 0 only); returns export.json metadata.

        On failure with export.on_error=skip the error is logged and returned as {"error": ...};
        earlier exports are untouched either way.
        """
        from train.export.hf_export import export_checkpoint

        started = time.perf_counter()
        try:
            meta = export_checkpoint(checkpoint_dir, self.out_dir(step), self.cfg,
                                     reference_logits=reference_logits,
                                     reference_precision=reference_precision)
        except Exception as exc:  # noqa: BLE001 - training outlives a failed export unless told otherwise
            if self.cfg.on_error == "raise":
                raise
            log.error("export of step %d failed (export.on_error=skip, training continues): %s", step, exc)
            return {"error": f"{type(exc).__name__}: {exc}", "step": step,
                    "export_time_s": time.perf_counter() - started}
        if meta.get("quality"):
            from train.export.quality import metrics

            meta["quality_metrics"] = metrics(meta["quality"])  # the loop logs these with export_time_s
        meta["pruned"] = [p.name for p in prune(self.exports_dir, self.cfg.keep_last)]
        meta["hooks"] = self._run_user_hooks(Path(meta["path"]), meta)
        return meta

    def _run_user_hooks(self, export_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
        results = []
        for name, hook in self.user_hooks:
            started = time.perf_counter()
            try:
                hook(export_dir, dict(meta))
                results.append({"hook": name, "ok": True, "time_s": time.perf_counter() - started})
            except Exception as exc:  # noqa: BLE001
                if self.cfg.on_error == "raise":
                    raise RuntimeError(f"{name} failed on {export_dir}: {exc}") from exc
                log.error("%s failed on %s: %s", name, export_dir, exc)
                results.append({"hook": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return results
