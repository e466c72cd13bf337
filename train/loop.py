"""The training loop: one function, the same for every strategy (STYLE 1).

Read top to bottom: set up -> resume -> for each step (accumulate micro-batches, step,
log, evaluate, checkpoint, export, stop on request) -> final checkpoint and export.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
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
from train.config import Config, grad_accum_steps
from train.data_loss import DataSourceStop, fetch_step, stop_message
from train.epochs import resolve_max_steps
from train.export.hook import ExportHook
from train.guard import DivergedError, StepGuard, first_nonfinite
from train.lock import acquire_run_lock
from train.loss import token_loss_sum
from train.metrics import MetricsFile
from train.model import build_meta_model, num_params, weight_source
from train.model_weights import resolve_base_dtype
from train.objectives.build import build_objective, evaluate_pairs
from train.objectives.build import setup as setup_objective
from train.resume import candidates, check_changes, restore
from train.signals import StopRequest
from train.startup import Phases, peak_rss_bytes, trainable_summary
from train.step import forward_backward, global_loss
from train.strategies import build_strategy, strategy_class
from train.strategies.base import Strategy
from train.tracking import build_tracker
from train.tracking.flops import mfu, model_flops_per_token, peak_flops
from train.tracking.progress import Progress
from train.tracking.redact import redact
from train.tracking.straggler import StragglerMonitor

log = logging.getLogger("scaletrain")


def train(cfg: Config, raw_cfg: dict[str, Any]) -> TrainState:
    info = d.init_distributed(cfg.trainer.device,
                              need_group=strategy_class(cfg.strategy.kind).needs_process_group,
                              timeout_s=cfg.dist.timeout_s)
    d.set_tf32(cfg.trainer.tf32, info.device)
    run_dir = Path(cfg.run.dir)
    lock = acquire_run_lock(run_dir, cfg.run.lock_stale_s, info.is_main)  # before anything is written
    accum = grad_accum_steps(cfg.trainer, info.world_size)
    t = cfg.trainer
    loader = build_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                          micro_batch_size=t.micro_batch_size, seq_len=t.seq_len,
                          pin_memory=info.device.type == "cuda")
    t.max_steps = raw_cfg["trainer"]["max_steps"] = resolve_max_steps(t, loader, info.world_size, accum)
    phases = Phases()  # start-up phases: build, load, engine, first step (train/startup.py)
    with phases.phase("build"):
        model = _build_model(cfg, loader.vocab_size, info)  # on the meta device (qlora: loaded 4-bit)
    if loader.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data has {loader.vocab_size} token ids but the model's vocabulary has "
                         f"{model.config.vocab_size}: use a tokenizer that matches model.path, or set "
                         "model.vocab_size >= the data's vocabulary")
    check_targets(model, cfg.adapter)  # every adapter.target_modules / modules_to_save entry matches a module
    adapter = _adapter_info(cfg, model, info)
    objective = build_objective(cfg, model, info, loader)  # a DPO reference copy: of the plain model
    with phases.phase("build"):
        base_dtype = resolve_base_dtype(cfg.model.base_dtype, cfg.model.path)
        model = apply_adapter(model, cfg.adapter, base_dtype)  # before checkpointing and sharding (STYLE 2)
    weights = weight_source(cfg.model, model, cfg.trainer.seed)
    n_params = num_params(model)
    flops_tok = model_flops_per_token(model, t.seq_len)  # before sharding hides the shapes

    public_cfg = redact(raw_cfg)
    ckpt_root = run_dir / "checkpoints"
    found = candidates(ckpt_root, cfg, info)
    if found:
        check_changes(found[0], cfg, public_cfg, model.config.to_dict())  # refuses before any engine starts
        check_resume_base(found[0], load_train_state(found[0]).adapter, adapter)
    faults.poison_loss(model, lambda: state.step + 1)  # SCALETRAIN_FAULT=nan@STEP only
    with phases.phase("engine"):
        strategy = build_strategy(model, cfg, info, accum, weights=weights, phases=phases)
    state = TrainState(world_size=info.world_size, model_config=model.config.to_dict(),
                       strategy=strategy.describe(), tokenizer_dir=loader.tokenizer_dir,
                       config_digest=_digest(raw_cfg), adapter=adapter)
    setup_objective(objective, strategy, cfg, info, run_dir, trained=bool(found))  # before restore
    resume_from, saved = restore(found, strategy, loader, info)
    if resume_from is not None:
        state.step, state.tokens, state.run_id = saved.step, saved.tokens, saved.run_id
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
    stop = StopRequest(run_dir, is_main=info.is_main, lock=lock)
    peak = peak_flops(info.device, cfg.tracking.peak_flops)
    straggler = StragglerMonitor(cfg.tracking.straggler_every, cfg.tracking.straggler_margin)
    progress = Progress(t.max_steps, initial_step=state.step, enabled=info.is_main and cfg.tracking.progress,
                        every_s=cfg.tracking.progress_every_s)
    log.info("model %s: %.2fM params | %s | strategy %s | world %d | accum %d | global batch %d",
             cfg.model.name, n_params / 1e6, trainable_summary(cfg.adapter.kind, cfg.adapter.r, model),
             cfg.strategy.name, info.world_size, accum,
             t.micro_batch_size * accum * info.world_size)

    exporter = ExportHook(cfg.export, run_dir, rank=info.rank)

    checkpointer = Checkpointer(ckpt_root, info, config_yaml, cfg.checkpoint.keep_last, cfg.checkpoint.verify)
    if cfg.checkpoint.async_save and not hasattr(strategy, "save_async"):
        log.warning("checkpoint.async=true: strategy %s saves blocking (only DDP and FSDP2 save in the "
                    "background)", cfg.strategy.name)

    def checkpoint(blocking: bool) -> Path | None:
        t0 = time.perf_counter()
        bad = first_nonfinite(strategy.state_tensors(), info.device)
        if bad is not None:
            log.error("not checkpointing step %d: %s holds NaN/inf", state.step, bad)
            return None
        path = checkpointer.save(state, strategy, loader.state_dict(), blocking)
        timing = {"step": state.step, "checkpoint_time_s": time.perf_counter() - t0}  # the stall
        metrics.write(timing)
        tracker.log(timing, state.step)
        return path

    guard = StepGuard(t, verbose=info.is_main)

    def roll_back() -> None:
        """Back to the newest finite checkpoint; the loader keeps its place past the bad data."""
        bad = guard.start_rollback()
        checkpointer.wait()  # a checkpoint still being written is published first (or dropped)
        older = [p for p in candidates(ckpt_root, cfg, info) if int(p.name[5:]) <= state.step]
        path, saved = restore(older, strategy, None, info)
        if path is None:
            raise DivergedError(f"bad steps in a row ({bad}) and no finite checkpoint to roll back to: "
                                "set checkpoint.every_steps so that there is one, or lower optim.lr")
        if info.is_main:
            log.warning("rolled back from step %d to %s after %s; the data since then is skipped",
                        state.step, path.name, bad)
        record = {"step": saved.step, "rollback": guard.rollbacks, "rolled_back_from": state.step,
                  "skipped_tokens": state.tokens - saved.tokens}
        metrics.write(record)
        tracker.log(record, saved.step)
        state.step, state.tokens = saved.step, saved.tokens

    tokens_per_step = t.micro_batch_size * t.seq_len * accum * info.world_size
    batches = iter(loader)
    window_t0, window_steps = time.perf_counter(), 0
    rss_before = d.all_gather_object(peak_rss_bytes())
    while state.step < t.max_steps and (t.max_tokens is None or state.tokens < t.max_tokens):
        step_t0 = time.perf_counter()
        micro_batches, data_wait, lost = fetch_step(batches, loader, accum, info.device)  # all ranks agree
        if lost is not None:  # the source is gone: checkpoint the last completed step, stop with one line
            raise DataSourceStop(stop_message(lost, state.step, checkpoint(blocking=True) if state.step else None))
        loss_sum, num_tokens = forward_backward(strategy, micro_batches, info.device, objective)
        loss = global_loss(loss_sum, num_tokens, info.device)  # the same on every rank: NaN anywhere is NaN everywhere
        skip = guard.verdict(loss)
        grad_norm = strategy.step(skip=skip is not None)
        lr = strategy.lr()
        state.step += 1
        state.tokens += tokens_per_step
        applied = guard.record(state.step, loss, grad_norm, skip)
        step_time = time.perf_counter() - step_t0
        window_steps += 1
        straggler.update(state.step, step_time, data_wait)  # every rank, every step (collective every N)
        if rss_before is not None:  # once: the startup record (collective: every rank's peak)
            phases.seconds["first_step"] = time.perf_counter() - step_t0
            startup = phases.record(rss_before, d.all_gather_object(peak_rss_bytes()))
            metrics.write({"step": state.step, "startup": startup})
            rss_before = None

        if state.step % t.log_every == 0 or state.step == t.max_steps or not applied:
            tokens_per_s = tokens_per_step * window_steps / (time.perf_counter() - window_t0)
            window_t0, window_steps = time.perf_counter(), 0
            record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                      "samples_per_s": tokens_per_s / t.seq_len,
                      "step_time_s": step_time, "data_wait_s": data_wait,
                      "data_wait_frac": data_wait / step_time, "mem_peak_gb": _mem_peak_gb(info.device),
                      **loader.metrics(), **guard.metrics(), **({} if applied else {"skipped": True}),
                      **objective.metrics(info.device)}  # DPO: rewards/*, logps/* (collective)
            util = mfu(record["tokens_per_s"] / info.world_size, flops_tok, peak)
            if util is not None:
                record["mfu"] = util
            record.update(straggler.metrics())  # straggler/* figures on exchange steps
            record.update(tracker.log(record, state.step))  # + alerts/* counters and sys/* memory
            metrics.write(record)
            progress.update(state.step, record)
            if info.is_main and progress.bar is None:  # on a terminal the bar shows these
                log.info("step %d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | wait %.1f%%",
                         state.step, loss, lr, grad_norm, record["tokens_per_s"], 100 * record["data_wait_frac"])
        if not applied and guard.rollback_due():
            roll_back()
            continue
        if t.eval_every and state.step % t.eval_every == 0:
            ev = evaluate_pairs(objective, strategy, cfg, info) if objective.kind == "dpo" else \
                evaluate(strategy, cfg, info)
            metrics.write({"step": state.step, **ev})
            tracker.log(ev, state.step)

        stopped = stop.agree(state.step, info.device)
        last = state.step >= t.max_steps or (t.max_tokens is not None and state.tokens >= t.max_tokens)
        every = cfg.checkpoint.every_steps
        export_now = exporter.due(state.step, final=last)
        if (every and state.step % every == 0) or stopped or (last and cfg.checkpoint.at_end) or export_now:
            # in the background only when training goes on and nothing reads the checkpoint next
            ckpt_path = checkpoint(blocking=not cfg.checkpoint.async_save or stopped or last or export_now)
            if ckpt_path is None and (last or stopped):
                raise DivergedError(f"the weights at step {state.step} are not finite; nothing was saved "
                                    "(the newest finite checkpoint is still in place)")
        checkpointer.poll()
        if export_now and ckpt_path is not None:  # from the checkpoint just written: equals an offline export
            timing = export(exporter, strategy, model.config, ckpt_path, state.step, info, tracker)
            metrics.write(timing)
        if stopped:
            log.warning("stop requested (%s): checkpointed step %d, exiting", stop.reason(), state.step)
            if info.is_main:
                stop.clear()
            break

    checkpointer.wait()
    progress.close()
    tracker.finish()
    d.barrier()
    d.shutdown()
    if lock is not None:
        lock.release()
    return state


def export(exporter: ExportHook, strategy: Strategy, model_cfg, ckpt_path: Path, step: int,
           info: d.DistInfo, tracker) -> dict[str, Any]:
    """Every rank runs the live (possibly sharded) model on the verification batch; rank 0 then
    exports the checkpoint and checks the exported model's logits against these."""
    t0 = time.perf_counter()
    ids = exporter.verify_batch(model_cfg.vocab_size, getattr(model_cfg, "max_position_embeddings", None))
    with strategy.forward_context():
        reference = strategy.model(input_ids=ids.to(info.device)).logits.float().cpu()
    meta: dict[str, Any] = {}
    if info.is_main:
        precision = "bf16" if strategy.compute_dtype == torch.bfloat16 else "fp32"
        meta = exporter(step, ckpt_path, reference_logits=reference, reference_precision=precision)
        if "path" in meta:
            tracker.log_export(meta["path"], meta)
    d.barrier()
    timing = {"step": step, "export_time_s": time.perf_counter() - t0, **meta.get("quality_metrics", {})}
    tracker.log(timing, step)
    return timing


def evaluate(strategy: Strategy, cfg: Config, info: d.DistInfo) -> dict[str, float]:
    """Token-mean loss over `trainer.eval_batches` held-out micro-batches per rank, and perplexity."""
    t = cfg.trainer
    loader = build_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                          micro_batch_size=t.micro_batch_size, seq_len=t.seq_len, split="val")
    loss_sum, tokens = 0.0, 0
    with strategy.forward_context():
        for _, batch in zip(range(t.eval_batches), loader):
            batch = {k: v.to(info.device) for k, v in batch.items()}
            loss_sum += token_loss_sum(strategy.model, batch, cfg.trainer.loss).sum.item()
            tokens += int((batch["labels"] != -100).sum())
    total, count = d.sum_across_ranks([loss_sum, float(tokens)], info.device)
    loss = total / max(1.0, count)  # mean over every evaluated token, as in training
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _build_model(cfg: Config, vocab_size: int | None, info: d.DistInfo) -> torch.nn.Module:
    if cfg.adapter.kind == "qlora":
        torch.manual_seed(cfg.trainer.seed)  # the adapter's initialisation, identical on every rank
        return quantized_base(cfg.model, info.device)
    return build_meta_model(cfg.model, vocab_size)


def _adapter_info(cfg: Config, model: torch.nn.Module, info: d.DistInfo) -> dict[str, Any] | None:
    """Rank 0 fingerprints the base (file hashes) once; every rank records the same."""
    if cfg.adapter.kind == "none":
        return None
    digest = base_content_digest(cfg.model) if cfg.checkpoint.verify and info.is_main else None
    fingerprint = base_fingerprint(cfg.model, model.config.to_dict(), cfg.trainer.seed)  # no weight read
    return adapter_info(cfg.adapter, cfg.model, fingerprint, d.broadcast_object(digest))


def _digest(raw_cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _mem_peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
