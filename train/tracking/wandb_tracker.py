"""The W&B tracker of rank 0: one W&B run per run directory, continued across resumes.

RUN_DIR/wandb/run_id keeps the run id and RUN_DIR/wandb/last_step the highest step already
logged, so a resumed or requeued job continues the same W&B run (`resume="allow"`) and
skips the steps it replays from its checkpoint: the step axis never goes backwards.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import string
import sys
from pathlib import Path
from typing import Any

import torch

from data_pipeline.fsutil import atomic_write_text
from train.tracking.config import TrackingConfig
from train.tracking.redact import redact, redact_argv, redact_text
from train.tracking.watch import Watch

log = logging.getLogger("scaletrain.tracking")

# The SDK would otherwise record sys.argv (which may carry tokens given as overrides), the
# program's source, the git diff and the console. The runtime facts worth keeping are logged
# into the config instead, redacted (see `_runtime`).
SAFE_SETTINGS: dict[str, Any] = {
    "x_disable_meta": True,
    "disable_code": True,
    "save_code": False,
    "disable_git": True,
    "disable_job_creation": True,
    "silent": True,
}


def resolve_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """auto -> WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline."""
    env = os.environ if environ is None else environ
    if mode != "auto":
        return mode
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


class WandbTracker:
    """Logs training records, exports and alerts to W&B (online or offline files)."""

    def __init__(self, cfg: TrackingConfig, *, run_dir: Path, config: dict[str, Any], resume: bool,
                 world_size: int, mode: str) -> None:
        import wandb  # rank 0 only: other ranks never import or start W&B

        self.cfg, self.mode, self._wandb = cfg, mode, wandb
        self.watch = Watch(cfg)
        self.state_dir = Path(run_dir) / "wandb"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stored = _read(self.state_dir / "run_id")
        run_id = cfg.run_id or (stored if resume else None) or new_run_id()
        floor = -1
        if resume and run_id == stored:
            floor = int(_read(self.state_dir / "last_step") or -1)
        else:
            (self.state_dir / "last_step").unlink(missing_ok=True)
        atomic_write_text(self.state_dir / "run_id", run_id + "\n")

        config = redact(config)
        name = cfg.name or (config.get("run") or {}).get("name")
        settings = wandb.Settings(**{**SAFE_SETTINGS, "console": cfg.console,
                                     "x_disable_stats": not cfg.system_stats,
                                     "init_timeout": cfg.init_timeout_s, **cfg.settings})
        kwargs = dict(project=cfg.project, entity=cfg.entity, group=_clean(cfg.group), name=_clean(name),
                      tags=[redact_text(t) for t in cfg.tags] or None, notes=_clean(cfg.notes), id=run_id,
                      resume="allow", dir=str(run_dir), job_type="train", mode=mode, settings=settings,
                      config={**config, "runtime": _runtime(world_size)})
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:
            if mode != "online":
                raise
            log.warning("wandb.init online failed (%s); logging offline into %s instead "
                        "(upload later with `wandb sync %s/offline-run-*`)", e, self.state_dir, self.state_dir)
            self.mode = kwargs["mode"] = "offline"
            self.run = wandb.init(**kwargs)
        if getattr(self.run, "resumed", False) and self.run.step:
            floor = max(floor, int(self.run.step) - 1)  # online: the server knows the run's last step
        self._floor = self._last = floor
        self._skipped = 0
        self._finished = False
        self._broken: str | None = None
        for key in ("loss", "eval_loss"):
            self.run.define_metric(key, summary="min")
        log.info("W&B run %s (%s) in %s%s", run_id, self.mode, self.state_dir,
                 f"; steps <= {floor} are already logged" if floor >= 0 else "")

    def log(self, metrics: dict[str, Any], step: int) -> dict[str, Any]:
        """Log `metrics` at trainer step `step`; returns the keys the tracker added."""
        extra, alert = self.watch.observe(metrics, step)
        if alert is not None:
            self.alert(alert.title, alert.text)
        if step <= self._floor:
            if not self._skipped:
                log.info("W&B: skipping replayed steps <= %d (already in run %s)", self._floor, self.run.id)
            self._skipped += 1
            return extra
        if step < self._last:
            log.warning("W&B: step %d is behind the last logged step %d; not logged", step, self._last)
            return extra
        data = {k: v for k, v in {**metrics, **extra}.items() if k != "step" and v is not None}
        if not self._call("log", self.run.log, data, step=step):
            return extra
        if step > self._last:
            self._last = step
            atomic_write_text(self.state_dir / "last_step", f"{step}\n")
        return extra

    def log_export(self, path: str | Path, metadata: dict[str, Any]) -> None:
        """Record an export directory as a model artifact by reference (nothing is uploaded)."""
        path = Path(path).resolve()
        if self._broken or not self.cfg.log_exports:
            return
        step = metadata.get("step")
        try:
            art = self._wandb.Artifact(f"model-{self.run.id}", type="model", metadata=redact(metadata))
            art.add_reference(path.as_uri(), checksum=self.cfg.export_checksum)
        except Exception as e:  # a bad path must not stop training
            log.warning("W&B: could not describe export %s as an artifact: %s", path, e)
            return
        aliases = ["latest"] + ([f"step_{step}"] if step is not None else [])
        self._call("log_artifact", self.run.log_artifact, art, aliases=aliases)

    def alert(self, title: str, text: str) -> None:
        """A logged warning always; a W&B alert (email/Slack) in online mode."""
        log.warning("%s: %s", title, text)
        if self.mode == "online":
            self._call("alert", self.run.alert, title=title, text=text, level=self._wandb.AlertLevel.WARN,
                       wait_duration=self.cfg.alert_wait_s)

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        self._call("finish", self.run.finish, exit_code=exit_code)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """Run one SDK call; the first failure (e.g. the wandb-core process was killed by a
        signal meant for the trainer) turns W&B off for the rest of the run instead of
        stopping training. metrics.jsonl keeps every record either way."""
        if self._broken:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:
            self._broken = f"{what}: {type(e).__name__}: {e}"
            log.warning("W&B %s failed (%s: %s); W&B logging is off for the rest of this run, "
                        "metrics.jsonl continues", what, type(e).__name__, e)
            return False


def _clean(value: str | None) -> str | None:
    return None if value is None else redact_text(str(value))


def _runtime(world_size: int) -> dict[str, Any]:
    """What the SDK's metadata would have shown, minus anything that could hold a secret."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"world_size": world_size, "host": socket.gethostname(), "gpu": gpu,
            "torch": torch.__version__, "python": sys.version.split()[0], "argv": redact_argv(sys.argv[1:])}
