"""The loop's per-step cost in collectives and host reads, counted on a real one-rank gloo group
under DDP (train/step.py): two small all-reduces and one host read per step, none more on a
non-logging step; and its twin: the losses are those of the host-side math the loop used before
(integer token count read back, loss read back, a separate stop all-reduce), and the NaN guard
still judges every step (an injected NaN step is skipped)."""
from __future__ import annotations

import logging
import signal
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from tests.helpers import REPO, TINY, compose_train, patched_environ
from tests.helpers.inprocess import build, one_rank_group

STEPS, LOG_EVERY, NAN_STEP = 8, 4, 3
OVERRIDES = [*TINY, f"trainer.max_steps={STEPS}", f"trainer.log_every={LOG_EVERY}", "trainer.global_batch_size=4",
             "trainer.micro_batch_size=2", "checkpoint.at_end=false", "tracking.straggler_every=0",
             "trainer.device=cpu"]
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "all_gather_into_tensor", "reduce_scatter_tensor")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


class Counting:
    """Counts collectives, and tensor->host reads by who asked: `read` (the loop: train/, data_pipeline/),
    `strategy_read` (train/strategies/: its grad-norm read) and `library_read` (torch, transformers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on, self.counts = False, Counter()
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._wrap(getattr(dist, name), lambda name=name: name))
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), self._reader))

    @staticmethod
    def _reader() -> str:
        caller = sys._getframe(2).f_code.co_filename
        if caller.startswith(str(REPO / "train" / "strategies")):
            return "strategy_read"
        return "read" if caller.startswith((str(REPO / "train"), str(REPO / "data_pipeline"))) else "library_read"

    def _wrap(self, fn, key):
        def counted(*args, **kwargs):
            if self.on:
                self.counts[key()] += 1
            return fn(*args, **kwargs)
        return counted


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory):
    """Steps of `python -m train` driven in-process: per step, (counts, StepResult)."""
    from train.config import load_config
    from train.data_loss import fetch_step
    from train.loop import after_step, train_step
    from train.run import finish, setup

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    mp = pytest.MonkeyPatch()
    run_dir = tmp_path_factory.mktemp("syncs")
    raw = compose_train([*OVERRIDES, f"run.dir={run_dir}"])
    steps, messages = [], []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("scaletrain").addHandler(handler)
    try:
        with patched_environ({"SCALETRAIN_FAULT": f"nan@{NAN_STEP}"}), one_rank_group("cpu"):
            run = setup(load_config(raw, world_size=1), raw)
            counter = Counting(mp)
            while run.stop is None:
                counter.counts.clear()
                counter.on = True
                micro_batches, wait, lost = fetch_step(run.batches, run.loader, run.accum, run.info.device)
                assert lost is None
                result = train_step(run, micro_batches, wait)
                after_step(run, result)
                counter.on = False
                steps.append((dict(counter.counts), result))
            finish(run)
    finally:
        logging.getLogger("scaletrain").removeHandler(handler)
        mp.undo()
        for s, h in handlers.items():
            signal.signal(s, h)
    return raw, steps, messages, run_dir


def test_two_all_reduces_and_one_host_read_per_step(counted_run):
    _, steps, _, _ = counted_run
    assert len(steps) == STEPS
    for i, (counts, result) in enumerate(steps, start=1):
        logging_step = i % LOG_EVERY == 0 or not result.applied
        assert counts.get("all_reduce") == 2, (i, counts)
        once = {"all_gather_object"} if i == 1 else set()  # the startup record, after the first step
        assert set(counts) <= {"all_reduce", "read", "strategy_read", "library_read"} | once, (i, counts)
        assert counts.get("strategy_read") == 1, (i, counts)  # TorchOptim.step: float(grad norm)
        if not logging_step:
            assert counts.get("read") == 1, (i, counts)


def test_same_losses_as_the_host_side_math_and_the_guard_still_judges(counted_run, tmp_path):
    """The old step, written out with the strategy alone: the integer global token count read back
    before backward, the loss sum read back and all-reduced, the guard's verdict."""
    from data_pipeline import build_loader
    from train.config import load_config
    from train.guard import StepGuard
    from train.step import forward_backward, global_loss, next_micro_batches

    raw, steps, _, _ = counted_run
    assert [r.applied for _, r in steps] == [i != NAN_STEP for i in range(1, STEPS + 1)], "the NaN step is skipped"
    assert all(r.counts == {"trained_tokens": 4 * 32, "tokens": 4 * 32} for _, r in steps)
    cfg = load_config(raw, world_size=1)
    with patched_environ({"SCALETRAIN_FAULT": ""}), one_rank_group("cpu") as info:
        _, strategy = build(info, tmp_path, *OVERRIDES)
        guard = StepGuard(cfg.trainer, verbose=False)
        batches = iter(build_loader(cfg.data, rank=0, world_size=1, micro_batch_size=2, seq_len=32))
        for i, (_, result) in enumerate(steps, start=1):
            micro_batches, _ = next_micro_batches(batches, 2, info.device)
            if i == NAN_STEP:  # the poisoned step: no update, as the loop's guard decided
                strategy.optim.optimizer.zero_grad(set_to_none=True)
                continue
            loss_sum, num_tokens = forward_backward(strategy, micro_batches, info.device)
            loss = global_loss(loss_sum, num_tokens, info.device)
            assert guard.verdict(loss) is None
            grad_norm = strategy.step(skip=False)
            assert result.loss == loss and result.grad_norm == grad_norm, (i, result, loss, grad_norm)


def test_one_voice_per_event_the_guard_not_the_loss_alert(counted_run):
    from train.metrics import read_metrics

    _, _, messages, run_dir = counted_run
    assert any(f"skipped step {NAN_STEP} on every rank: loss is nan" in m for m in messages), messages
    assert not any("loss is nan at step" in m for m in messages), messages  # the tracker's old alert
    record = next(r for r in read_metrics(run_dir) if r.get("step") == NAN_STEP and "loss" in r)
    assert record["skipped"] and record["alerts/loss_nonfinite"] == 1  # still counted
