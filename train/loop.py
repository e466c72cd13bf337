"""The training loop: one loop, the same for every strategy (docs/STYLE.md §1), in torchtitan's shape.

    run = setup(cfg, raw_cfg)              train/run.py: everything the loop uses, built once
    while run.stop is None:
        data = fetcher.fetch()             the step's micro-batches (train/data_loss.py)
        result = train_step(run, data)     forward/backward, clip, the guard's verdict, optimizer step
        after_step(run, result)            log, roll back, evaluate, stop condition, checkpoint, export
    finish(run)

Per step the loop makes two small all-reduces and ONE host read (train/step.py): the step's
counts (kept on the device), then [loss sum, stop flag, lost-source flag]; the read (those, and
the grad norm the strategy left on the device) feeds the NaN guard, which must judge every step
before its update. Everything else is read only on logging steps.

Extension points (each a small addition):
- another objective (DPO over paired batches): a class following `train.step.Objective` set as
  `Run.objective` in `setup`; `train_step` and the guard do not change.
- more counts per step (per-source token counts of a data mixture): extra keys returned by the
  objective's `counts()`; they are summed over ranks in the same all-reduce and arrive in
  `StepResult.counts`; `log_step` writes the keys it is given.
- another reason to stop: one more branch in `stop_reason`, returning `Stop(reason,
  complete=False, interrupted=True)`; `save_and_export` then checkpoints that step and the loop
  ends. (A lost data source is a stop before the step's update, so `stop_for_lost_data` handles
  it: the last completed step is checkpointed and the run ends with one line, train/data_loss.py.)
- set-up records: `setup` times its phases (train/startup.py); the `startup` record is written
  after the first step (`write_startup`).
"""
from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from data_pipeline import build_loader
from train import dist as d
from train.checkpoint import TrainState
from train.checkpoint_layout import step_of
from train.config import Config
from train.data_loss import DataSourceStop, StepData, StepFetcher, agree_on_loss, stop_message
from train.export.hook import ExportHook
from train.guard import DivergedError, first_nonfinite
from train.loss import token_loss_sum
from train.objectives.build import evaluate_pairs
from train.resume import candidates, restore
from train.run import Run, Stop, finish, setup
from train.startup import peak_rss_bytes
from train.step import read_back, reduce_counts, reduce_loss_and_flags
from train.strategies.base import Strategy
from train.tracking.flops import mfu

log = logging.getLogger("scaletrain")


def train(cfg: Config, raw_cfg: dict[str, Any], keep: list[Run] | None = None) -> TrainState:
    """The run; `keep`: a list the Run is appended to, so that the caller can exit without tearing
    its engines and process group down (train/__main__.py `exit_at_once`)."""
    run = setup(cfg, raw_cfg)
    if keep is not None:
        keep.append(run)
    run.stop = stop_reason(run, requested=False)  # a resumed run may already be complete
    fetcher = StepFetcher(run.batches, run.loader, run.accum, run.info.device)
    while run.stop is None:
        data = fetcher.fetch()
        result = None if data.lost_everywhere else train_step(run, data)
        if result is None or result.data_lost:
            stop_for_lost_data(run, data)
        after_step(run, result)
    finish(run)
    return run.state


@dataclass
class StepResult:
    """One step; everything but the timings is identical on every rank."""
    loss: float
    """Global mean of the objective (token mean over the global batch)."""
    grad_norm: float | torch.Tensor
    """A device tensor where the engine computed it inside its step (DeepSpeed): read on logging steps."""
    lr: float
    applied: bool
    """The optimizer update was applied (False: the NaN guard skipped the step)."""
    counts: dict[str, int]
    """The step's global counts: `tokens` (real, non-pad), `trained_tokens`, and any an objective adds."""
    stop_requested: bool
    """Some rank was asked to stop (signal, STOP file, dead launcher, lost lock)."""
    data_wait_s: float
    step_time_s: float
    data_lost: bool = False
    """Some rank's data source is lost: no update was applied, the loop stops (train/data_loss.py)."""


def train_step(run: Run, data: StepData) -> StepResult:
    """Forward and backward over the step's micro-batches, the clip, the guard's verdict, the
    optimizer step. Two all-reduces and one host read (train/step.py)."""
    t0 = time.perf_counter() - data.wait
    d.note_step(run.state.step)  # the last completed step, for a collective that times out
    local = run.objective.counts(data.micro_batches)
    counts = reduce_counts(local)  # collective 1, stays on the device
    normaliser = counts[list(local).index(run.objective.normaliser)]
    loss_sum = run.objective.forward_backward(run.strategy, data.micro_batches, normaliser)
    norm = run.strategy.clip_grads()  # on the device; None: the engine clips inside its step (DeepSpeed)
    packed = reduce_loss_and_flags(loss_sum, run.stop_request.local(), data.lost is not None)  # collective 2
    host = read_back(counts, packed, norm)  # the one host read
    step_counts = dict(zip(local, host.counts))
    loss = host.loss_sum / max(1, step_counts[run.objective.normaliser])
    if host.losers:  # a rank ran on a stand-in batch: no update on any rank
        return StepResult(loss=loss, grad_norm=math.nan, lr=run.strategy.lr(), applied=False, counts=step_counts,
                          stop_requested=host.stoppers > 0, data_wait_s=data.wait,
                          step_time_s=time.perf_counter() - t0, data_lost=True)
    skip = run.guard.verdict(loss, host.grad_norm)  # every rank reaches the same verdict from the same values
    update = run.strategy.step(skip=skip is not None)
    if skip is None and not update.applied:  # the engine's own overflow check (DeepSpeed): a skipped step logs
        skip = f"gradient norm is {float(update.grad_norm)}"
    applied = run.guard.record(run.state.step + 1, loss, host.grad_norm, skip)
    grad_norm = host.grad_norm if host.grad_norm is not None else update.grad_norm
    return StepResult(loss=loss, grad_norm=grad_norm, lr=run.strategy.lr(), applied=applied, counts=step_counts,
                      stop_requested=host.stoppers > 0, data_wait_s=data.wait,
                      step_time_s=time.perf_counter() - t0)


def stop_for_lost_data(run: Run, data: StepData) -> NoReturn:
    """Some rank's data source is gone: every rank checkpoints the last completed step and the run
    ends with one line (train/data_loss.py)."""
    reason = agree_on_loss(data, run.loader)
    saved = checkpoint(run, blocking=True) if run.state.step else None
    raise DataSourceStop(stop_message(reason, run.state.step, saved))


def after_step(run: Run, result: StepResult) -> None:
    """Account for the step, then the after-step work in its order."""
    state, t = run.state, run.cfg.trainer
    state.step += 1
    state.tokens += result.counts["tokens"]
    state.trained_tokens += result.counts["trained_tokens"]
    run.window.steps += 1
    run.window.tokens += result.counts["tokens"]
    run.straggler.update(state.step, result.step_time_s, result.data_wait_s)  # collective every N steps
    if run.rss_before is not None:
        write_startup(run, result.step_time_s)
    if state.step % t.log_every == 0 or state.step == t.max_steps or not result.applied:
        log_step(run, result)
    if not result.applied and run.guard.rollback_due():
        roll_back(run)
        return
    if t.eval_every and state.step % t.eval_every == 0:
        ev = evaluate_pairs(run.objective, run.strategy, run.cfg, run.info) if run.objective.kind == "dpo" \
            else evaluate(run.strategy, run.cfg, run.info)
        run.metrics.write({"step": state.step, **ev})
        run.tracker.log(ev, state.step)
    run.stop = stop_reason(run, requested=result.stop_requested)
    save_and_export(run)


def write_startup(run: Run, first_step_s: float) -> None:
    """Once, after the first step: the start-up phases and every rank's peak RSS (collective)."""
    run.phases.seconds["first_step"] = first_step_s
    startup = run.phases.record(run.rss_before, d.all_gather_object(peak_rss_bytes()))
    run.metrics.write({"step": run.state.step, "startup": startup})
    run.rss_before = None


def stop_reason(run: Run, requested: bool) -> Stop | None:
    """The stop condition, the only place it is written: None to go on."""
    t, s = run.cfg.trainer, run.state
    complete = s.step >= t.max_steps or (t.max_tokens is not None and s.tokens >= t.max_tokens)
    if requested:
        return Stop(f"stop requested ({run.stop_request.reason()})", complete=complete, interrupted=True)
    if complete:
        limit = "trainer.max_steps" if s.step >= t.max_steps else "trainer.max_tokens"
        return Stop(f"{limit} reached", complete=True, interrupted=False)
    return None


def log_step(run: Run, result: StepResult) -> None:
    """One metrics.jsonl record (+ tracker, progress bar or log line) covering the window since the last one."""
    state, t, w = run.state, run.cfg.trainer, run.window
    grad_norm = float(result.grad_norm)  # DeepSpeed's device norm: read here, on logging steps only
    elapsed = time.perf_counter() - w.t0
    tokens_per_s = w.tokens / elapsed
    capacity = run.rows_per_step * t.seq_len * w.steps  # input positions of the window, padding included
    record = {"step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": grad_norm,
              "tokens": state.tokens, "trained_tokens": state.trained_tokens, "tokens_per_s": tokens_per_s,
              "padding_frac": 1.0 - w.tokens / capacity, "samples_per_s": run.rows_per_step * w.steps / elapsed,
              "step_time_s": result.step_time_s, "data_wait_s": result.data_wait_s,
              "data_wait_frac": result.data_wait_s / result.step_time_s, "mem_peak_gb": _mem_peak_gb(run.info.device),
              **run.loader.metrics(), **run.guard.metrics(), **({} if result.applied else {"skipped": True}),
              **run.objective.metrics(run.info.device)}  # DPO: rewards/*, logps/* (collective, logging steps)
    w.reset()
    util = mfu(tokens_per_s / run.info.world_size, run.flops_per_token, run.peak_flops)  # real tokens only
    if util is not None:
        record["mfu"] = util
    record.update(run.straggler.metrics())  # straggler/* figures on exchange steps
    record.update(run.tracker.log(record, state.step))  # + alerts/* counters and sys/* memory
    run.metrics.write(record)
    run.progress.update(state.step, record)
    if run.info.is_main and run.progress.bar is None:  # on a terminal the bar shows these
        log.info("step %d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | wait %.1f%%", state.step, result.loss,
                 result.lr, grad_norm, tokens_per_s, 100 * record["data_wait_frac"])


def save_and_export(run: Run) -> None:
    """Checkpoint when due (every N steps, on a stop, at the end, before an export), then export."""
    state, ckpt, stop = run.state, run.cfg.checkpoint, run.stop
    complete = stop is not None and stop.complete
    interrupted = stop is not None and stop.interrupted
    export_now = run.exporter.due(state.step, final=complete)
    path = None
    if (ckpt.every_steps and state.step % ckpt.every_steps == 0) or interrupted or \
            (complete and ckpt.at_end) or export_now:
        # in the background only when training goes on and nothing reads the checkpoint next
        path = checkpoint(run, blocking=not ckpt.async_save or stop is not None or export_now)
        if path is None and stop is not None:
            raise DivergedError(f"the weights at step {state.step} are not finite; nothing was saved "
                                "(the newest finite checkpoint is still in place)")
    run.checkpointer.poll()
    if export_now and path is not None:  # from the checkpoint just written: equals an offline export
        run.metrics.write(export(run.exporter, run.strategy, run.model_config, path, state.step, run.info,
                                 run.tracker))
    if interrupted:
        log.warning("%s: checkpointed step %d, exiting", stop.reason, state.step)
        if run.info.is_main:
            run.stop_request.clear()


def checkpoint(run: Run, blocking: bool) -> Path | None:
    """Save the current step, unless a weight or optimizer tensor is not finite (then None)."""
    t0 = time.perf_counter()
    bad = first_nonfinite(run.strategy.state_tensors(), run.info.device)
    if bad is not None:
        log.error("not checkpointing step %d: %s holds NaN/inf", run.state.step, bad)
        return None
    path = run.checkpointer.save(run.state, run.strategy, run.loader.state_dict(), blocking)
    timing = {"step": run.state.step, "checkpoint_time_s": time.perf_counter() - t0}  # the stall
    run.metrics.write(timing)
    run.tracker.log(timing, run.state.step)
    return path


def roll_back(run: Run) -> None:
    """Back to the newest finite checkpoint; the loader keeps its place past the bad data."""
    state, info = run.state, run.info
    bad = run.guard.start_rollback()
    run.checkpointer.wait()  # a checkpoint still being written is published first (or dropped)
    older = [p for p in candidates(run.checkpointer.root, run.cfg, info) if step_of(p) <= state.step]
    path, saved = restore(older, run.strategy, None, info)
    if path is None:
        raise DivergedError(f"bad steps in a row ({bad}) and no finite checkpoint to roll back to: "
                            "set checkpoint.every_steps so that there is one, or lower optim.lr")
    if info.is_main:
        log.warning("rolled back from step %d to %s after %s; the data since then is skipped",
                    state.step, path.name, bad)
    record = {"step": saved.step, "rollback": run.guard.rollbacks, "rolled_back_from": state.step,
              "skipped_tokens": state.tokens - saved.tokens}
    run.metrics.write(record)
    run.tracker.log(record, saved.step)
    state.step, state.tokens, state.trained_tokens = saved.step, saved.tokens, saved.trained_tokens


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


def _mem_peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
