"""Set-up of a training run: `setup(cfg, raw_cfg) -> Run`, everything the loop uses, built once.

The order matters and is the one place it is written: the run lock before anything is written,
the data before the model (its vocabulary sizes the model), the adapter before the strategy
shards the model (docs/STYLE.md §2), the resume checks before any engine starts, the restore
before metrics.jsonl is truncated. `finish(run)` undoes what set-up started.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data_pipeline import build_loader
from data_pipeline.fsutil import atomic_write_text
from train import dist as d
from train import faults
from train.adapters.lora import (
    adapter_info,
    apply_adapter,
    base_content_digest,
    base_fingerprint,
    check_resume_base,
    quantized_base,
)
from train.adapters.targets import check_targets
from train.checkpoint import Checkpointer, TrainState, load_train_state
from train.checkpoint_layout import CHECKPOINTS_DIR
from train.config import Config, grad_accum_steps
from train.epochs import resolve_max_steps
from train.export.hook import ExportHook
from train.guard import StepGuard
from train.host_memory import tune_allocator
from train.lock import acquire_run_lock
from train.metrics import MetricsFile
from train.model import build_meta_model, num_params, weight_source
from train.model_weights import resolve_base_dtype
from train.objectives import Objective
from train.objectives.build import build_objective
from train.objectives.build import setup as setup_objective
from train.resume import candidates, check_changes, restore
from train.signals import StopRequest
from train.startup import Phases, peak_rss_bytes, trainable_summary
from train.strategies import build_strategy, strategy_class
from train.strategies.base import Strategy
from train.tracking import build_tracker
from train.tracking.flops import model_flops_per_token, peak_flops
from train.tracking.progress import Progress
from train.tracking.redact import redact
from train.tracking.straggler import StragglerMonitor

log = logging.getLogger("scaletrain")


@dataclass(frozen=True)
class Stop:
    """Why the loop ends after the current step (train/loop.py `stop_reason`)."""
    reason: str
    complete: bool
    """The run reached its length (trainer.max_steps / max_tokens): final checkpoint and export as configured."""
    interrupted: bool
    """Asked to end early (signal, STOP file, dead launcher, lost lock): always checkpointed, blocking."""


@dataclass
class Window:
    """Counters of the steps since the last logged step: throughput covers the whole window."""
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0

    def reset(self) -> None:
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0


@dataclass
class Run:
    """What the loop uses; built by `setup`, mutated only through `state`, `window` and `stop`."""
    cfg: Config
    info: d.DistInfo
    run_dir: Path
    state: TrainState
    strategy: Strategy
    objective: Objective
    loader: Any
    batches: Any
    """The training loader's iterator: the loop takes `accum` micro-batches from it per step."""
    accum: int
    guard: StepGuard
    stop_request: StopRequest
    checkpointer: Checkpointer
    exporter: ExportHook
    metrics: MetricsFile
    tracker: Any
    progress: Progress
    straggler: StragglerMonitor
    model_config: Any
    flops_per_token: float
    peak_flops: float | None
    lock: Any = None
    resumed_from: Path | None = None
    phases: Phases | None = None
    """Start-up phases (train/startup.py); the `startup` record is written after the first step."""
    rss_before: list[int] | None = None
    """Every rank's peak RSS before the first step (None once the startup record is written)."""
    window: Window = field(default_factory=Window)
    stop: Stop | None = None
    """Set by the stop condition; the loop ends when it is not None."""

    @property
    def rows_per_step(self) -> int:
        return self.cfg.trainer.micro_batch_size * self.accum * self.info.world_size


def setup(cfg: Config, raw_cfg: dict[str, Any]) -> Run:
    t = cfg.trainer
    info = d.init_distributed(t.device, need_group=strategy_class(cfg.strategy.kind).needs_process_group,
                              timeout_s=cfg.dist.timeout_s)
    d.set_tf32(t.tf32, info.device)
    run_dir = Path(cfg.run.dir)
    lock = acquire_run_lock(run_dir, cfg.run.lock_stale_s, info.is_main)  # before anything is written
    accum = grad_accum_steps(t, info.world_size)
    loader = build_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                          micro_batch_size=t.micro_batch_size, seq_len=t.seq_len,
                          pin_memory=info.device.type == "cuda")
    t.max_steps = raw_cfg["trainer"]["max_steps"] = resolve_max_steps(t, loader, info.world_size, accum)
    phases = Phases()  # start-up phases: build, load, engine, first step (train/startup.py)
    with phases.phase("build"):
        model = _build_model(cfg, loader.vocab_size, info)  # on the meta device (qlora: loaded 4-bit)
    tune_allocator(getattr(model.config, "hidden_size", None))  # a wide model's activations mapped too
    if loader.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data has {loader.vocab_size} token ids but the model's vocabulary has "
                         f"{model.config.vocab_size}: use a tokenizer that matches model.path, or set "
                         "model.vocab_size >= the data's vocabulary")
    check_targets(model, cfg.adapter)  # every adapter.target_modules / modules_to_save entry matches a module
    adapter = _adapter_info(cfg, model, info)
    objective = build_objective(cfg, model, info, loader, phases)  # a DPO reference copy: of the plain model
    with phases.phase("build", "adapter"):
        base_dtype = resolve_base_dtype(cfg.model.base_dtype, cfg.model.path)
        model = apply_adapter(model, cfg.adapter, base_dtype)  # before checkpointing and sharding (docs/STYLE.md §2)
    weights = weight_source(cfg.model, model, t.seed)
    n_params = num_params(model)
    trainable = trainable_summary(cfg.adapter.kind, cfg.adapter.r, model)  # before ZeRO-3 empties the parameters
    flops_tok = model_flops_per_token(model, t.seq_len)  # before sharding hides the shapes

    public_cfg = redact(raw_cfg)
    ckpt_root = run_dir / CHECKPOINTS_DIR
    found = candidates(ckpt_root, cfg, info)
    if found:
        check_changes(found[0], cfg, public_cfg, model.config.to_dict())  # refuses before any engine starts
        check_resume_base(found[0], load_train_state(found[0]).adapter, adapter)
    state = TrainState(world_size=info.world_size, model_config=model.config.to_dict(),
                       tokenizer_dir=loader.tokenizer_dir, config_digest=_digest(raw_cfg), adapter=adapter)
    faults.poison_loss(model, lambda: state.step + 1)  # SCALETRAIN_FAULT=nan@STEP only
    with phases.phase("engine"):
        strategy = build_strategy(model, cfg, info, accum, weights=weights, phases=phases)
    state.strategy = strategy.describe()
    setup_objective(objective, strategy, cfg, info, run_dir, trained=bool(found))  # before restore
    resume_from, saved = restore(found, strategy, loader, info)
    if resume_from is not None:
        state.step, state.tokens, state.trained_tokens = saved.step, saved.tokens, saved.trained_tokens
        state.run_id = saved.run_id
        log.info("resumed from %s at step %d", resume_from, state.step)

    config_yaml = OmegaConf.to_yaml(OmegaConf.create(public_cfg))
    if info.is_main:
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=info.is_main)
    metrics.truncate_after(state.step)
    if resume_from is not None:  # marks where this attempt begins (the report draws it)
        metrics.write({"step": state.step, "resumed_from": resume_from.name})
    tracker = build_tracker(cfg.tracking, run_dir=run_dir, rank=info.rank, world_size=info.world_size,
                            config=public_cfg, resume=resume_from is not None)
    log.info("model %s: %.2fM params | %s | strategy %s | world %d | accum %d | global batch %d",
             cfg.model.name, n_params / 1e6, trainable,
             cfg.strategy.name, info.world_size, accum, t.micro_batch_size * accum * info.world_size)
    if cfg.checkpoint.async_save and not hasattr(strategy, "save_async"):
        log.warning("checkpoint.async=true: strategy %s saves blocking (only DDP and FSDP2 save in the "
                    "background)", cfg.strategy.name)
    return Run(
        cfg=cfg, info=info, run_dir=run_dir, state=state, strategy=strategy,
        objective=objective,
        loader=loader, batches=iter(loader), accum=accum,
        guard=StepGuard(t, verbose=info.is_main),
        stop_request=StopRequest(run_dir, is_main=info.is_main, lock=lock),
        checkpointer=Checkpointer(ckpt_root, info, config_yaml, cfg.checkpoint.keep_last, cfg.checkpoint.verify),
        exporter=ExportHook(cfg.export, run_dir, rank=info.rank),
        metrics=metrics, tracker=tracker,
        progress=Progress(t.max_steps, initial_step=state.step, enabled=info.is_main and cfg.tracking.progress,
                          every_s=cfg.tracking.progress_every_s),
        straggler=StragglerMonitor(cfg.tracking.straggler_every, cfg.tracking.straggler_margin),
        model_config=model.config, flops_per_token=flops_tok, peak_flops=peak_flops(info.device, cfg.tracking.peak_flops),
        lock=lock, resumed_from=resume_from, phases=phases,
        rss_before=d.all_gather_object(peak_rss_bytes()))


def finish(run: Run) -> None:
    """Stop the data workers, wait for a background checkpoint, close the trackers, leave the process
    group, free the lock."""
    close = getattr(run.batches, "close", None)
    if close is not None:  # DataLoader workers from the forkserver (data_pipeline/read/stream.py) end
        close()            # and their queues' semaphores are released before the rank's os._exit
    run.checkpointer.wait()
    run.progress.close()
    run.tracker.finish()
    d.barrier()
    d.shutdown()
    if run.lock is not None:
        run.lock.release()


def _build_model(cfg: Config, vocab_size: int | None, info: d.DistInfo) -> torch.nn.Module:
    if cfg.adapter.kind == "qlora":
        torch.manual_seed(cfg.trainer.seed)  # the adapter's initialisation, identical on every rank
        return quantized_base(cfg.model, info.device)
    return build_meta_model(cfg.model, vocab_size)


def _adapter_info(cfg: Config, model: torch.nn.Module, info: d.DistInfo) -> dict[str, Any] | None:
    """The base's identity without reading its weights (names, sizes, safetensors headers); the
    full content digest only under checkpoint.verify=true (rank 0 reads it, every rank records it)."""
    if cfg.adapter.kind == "none":
        return None
    digest = base_content_digest(cfg.model) if cfg.checkpoint.verify and info.is_main else None
    fingerprint = base_fingerprint(cfg.model, model.config.to_dict(), cfg.trainer.seed)  # no weight read
    return adapter_info(cfg.adapter, cfg.model, fingerprint, d.broadcast_object(digest))


def _digest(raw_cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
