"""The loop's per-step cost in collectives and host reads, counted on a real one-rank gloo group
while `train.loop.train` itself runs under DDP (train/step.py): two small all-reduces and ONE
host read per step, the grad norm included (no read by the strategy, none by torch's clip), none
more on a non-logging step, and with webdataset data no all-reduce of its own for the data-loss
agreement after the first step. Twins: the losses and grad norms are those of the host-side
math written out step by step, the NaN guard still judges every step (an injected NaN step is
skipped), and a data source lost mid-run still stops the run through the flag in the step's
all-reduce: no update from that step, the last completed step checkpointed, one line."""
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
COMMON = ["trainer.global_batch_size=4", "trainer.micro_batch_size=2", "checkpoint.at_end=false",
          "tracking.straggler_every=0", "trainer.device=cpu"]
OVERRIDES = [*TINY, f"trainer.max_steps={STEPS}", f"trainer.log_every={LOG_EVERY}", *COMMON]
LOSE_AT = 5  # the webdataset run's source dies when step 5 takes its first micro-batch
URL = "http://127.0.0.1:9/corpus/train/shard-000003.tar"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "all_gather_into_tensor", "reduce_scatter_tensor")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


class Counting:
    """Per step (a step starts when the loop fetches its data), collectives and tensor->host reads
    by who asked: `read` (the loop: train/, data_pipeline/), `strategy_read` (train/strategies/)
    and `library_read` (torch, transformers; `library_files` says where)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on, self.steps, self.library_files = False, [], set()
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._wrap(getattr(dist, name), lambda name=name: name))
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), self._reader))

    def _reader(self) -> str:
        caller = sys._getframe(2).f_code.co_filename
        if caller.startswith(str(REPO / "train" / "strategies")):
            return "strategy_read"
        if caller.startswith((str(REPO / "train"), str(REPO / "data_pipeline"))):
            return "read"
        self.library_files.add(caller.split("site-packages/")[-1])
        return "library_read"

    def _wrap(self, fn, key):
        def counted(*args, **kwargs):
            if self.on:
                self.steps[-1][key()] += 1
            return fn(*args, **kwargs)
        return counted


def drive(run_dir, overrides: list[str], env: dict[str, str], lose_at: int | None = None):
    """`train.loop.train` in-process on a one-rank gloo group, counted step by step. Returns
    (raw config, per step (counts, StepResult), warnings logged, the Run, what was seen after the
    last completed step (parameters, loader state), the exception the run ended with)."""
    import train.loop as loop
    from data_pipeline.storage.backends import DataSourceLost, FetchError
    from train.config import load_config

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    mp = pytest.MonkeyPatch()
    raw = compose_train([*overrides, f"run.dir={run_dir}"])
    counter, results, messages, seen = Counting(mp), [], [], {}
    fetch, after_step, agree, finish = loop.StepFetcher.fetch, loop.after_step, loop.agree_on_loss, loop.finish

    def counted_fetch(fetcher):
        counter.steps.append(Counter())
        counter.on = True
        if lose_at is not None and len(counter.steps) == lose_at:
            def dead():
                raise DataSourceLost.from_fetch(FetchError(URL, None, "Connection refused", 2))
                yield
            fetcher.batches = dead()
        return fetch(fetcher)

    def counted_after_step(run, result):
        results.append(result)
        after_step(run, result)
        counter.on = False
        seen.update(run=run, params=[p.detach().clone() for p in run.strategy.model.parameters()],
                    loader=run.loader.state_dict())

    def off(fn):
        def wrapped(*args):
            counter.on = False  # the failure path's own collectives (reason, checkpoint) are not the step's
            return fn(*args)
        return wrapped

    mp.setattr(loop.StepFetcher, "fetch", counted_fetch)
    mp.setattr(loop, "after_step", counted_after_step)
    mp.setattr(loop, "agree_on_loss", off(agree))
    mp.setattr(loop, "finish", off(finish))
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("scaletrain").addHandler(handler)
    error = None
    try:
        with patched_environ(env), one_rank_group("cpu"):
            try:
                loop.train(load_config(raw, world_size=1), raw)
            except loop.DataSourceStop as e:
                error = e
    finally:
        logging.getLogger("scaletrain").removeHandler(handler)
        mp.undo()
        for s, h in handlers.items():
            signal.signal(s, h)
    steps = [(dict(c), r) for c, r in zip(counter.steps, results)]
    lost_step = dict(counter.steps[-1]) if error is not None else None
    seen["library_files"] = counter.library_files
    return raw, steps, messages, seen, error, lost_step


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory):
    """Synthetic data, a NaN injected at step NAN_STEP."""
    run_dir = tmp_path_factory.mktemp("syncs")
    raw, steps, messages, seen, _, _ = drive(run_dir, OVERRIDES, {"SCALETRAIN_FAULT": f"nan@{NAN_STEP}"})
    return raw, steps, messages, run_dir, seen["library_files"]


@pytest.fixture(scope="module")
def lost_run(tmp_path_factory):
    """Webdataset data from local shards (no DataLoader worker); the source dies at step LOSE_AT."""
    from tests.support.data import make_shards

    shards = make_shards(tmp_path_factory.mktemp("shards"), sizes=(6,) * 8, min_len=5, max_len=15,
                         vocab_size=256, content="random")
    run_dir = tmp_path_factory.mktemp("lost")
    overrides = [*TINY, "trainer.max_steps=12", "trainer.log_every=100", *COMMON, "data=webdataset",
                 f"data.urls={shards.root}", "data.num_workers=0", "data.shuffle_buffer=8"]
    return run_dir, *drive(run_dir, overrides, {"SCALETRAIN_FAULT": ""}, lose_at=LOSE_AT)


def test_two_all_reduces_and_one_host_read_per_step(counted_run):
    """The grad norm travels in the loop's one read: the strategy reads nothing, and torch's clip
    reads nothing either. What the libraries read is theirs: torch's AdamW reads its step counters
    (CPU scalars, not a device sync) and transformers' Llama checks position_ids for packed
    sequences once per forward (masking_utils)."""
    _, steps, _, _, library_files = counted_run
    assert len(steps) == STEPS
    for i, (counts, result) in enumerate(steps, start=1):
        logging_step = i % LOG_EVERY == 0 or not result.applied
        once = {"all_gather_object"} if i == 1 else set()  # the startup record, after the first step
        assert set(counts) <= {"all_reduce", "read", "library_read"} | once, (i, counts)  # no strategy read
        assert counts["all_reduce"] == 2, (i, counts)
        if not logging_step:
            assert counts["read"] == 1, (i, counts)
    assert library_files == {"torch/optim/optimizer.py", "transformers/masking_utils.py",
                             "torch/distributed/distributed_c10d.py"}, library_files  # c10d: step 1's all_gather_object


def test_webdataset_adds_no_collective_after_the_first_step(lost_run):
    """The data-loss agreement rides in the step's second all-reduce; only a process's first step
    agrees on its own (no previous batch to stand in with): one all-reduce and one read, once."""
    _, _, steps, _, _, _, _ = lost_run
    assert len(steps) == LOSE_AT - 1
    first = {k: v for k, v in steps[0][0].items() if k != "library_read"}
    assert first == {"all_reduce": 3, "read": 2, "all_gather_object": 1}, steps[0][0]
    for i, (counts, _) in enumerate(steps[1:], start=2):
        assert (counts["all_reduce"], counts["read"], set(counts)) == (2, 1, {"all_reduce", "read", "library_read"}), \
            (i, counts)


def test_a_lost_source_still_stops_through_the_flag(lost_run):
    """Twin: the flag is on. At step LOSE_AT the rank runs the step on its previous batch (same two
    all-reduces, one read: no collective of its own), sees the loss in the read, applies no update,
    checkpoints the last completed step with the loader where that step left it, one line."""
    from train.checkpoint_layout import check_checkpoint

    run_dir, _, steps, _, seen, error, lost_step = lost_run
    assert error is not None, "the run should have stopped"
    assert (lost_step["all_reduce"], lost_step["read"], set(lost_step)) == (2, 1, {"all_reduce", "read", "library_read"})
    done = LOSE_AT - 1
    assert str(error).startswith(f"stopped before step {LOSE_AT}: data source lost: {URL}: no HTTP status")
    assert f"checkpointed step {done}" in str(error) and "\n" not in str(error)
    run = seen["run"]
    assert run.state.step == done
    for before, now in zip(seen["params"], run.strategy.model.parameters(), strict=True):
        assert torch.equal(before, now)  # the stand-in step's gradients were never applied
    assert run.loader.state_dict() == seen["loader"]  # resumes at step LOSE_AT's batches
    ckpt = run_dir / "checkpoints" / f"step_{done:08d}"
    assert check_checkpoint(ckpt) is None


def test_same_losses_as_the_host_side_math_and_the_guard_still_judges(counted_run, tmp_path):
    """The old step, written out with the strategy alone: the integer global token count read back
    before backward, the loss sum read back and all-reduced, the guard's verdict, the grad norm
    read back by `optimizer_step`."""
    from data_pipeline import build_loader
    from train.config import load_config
    from train.guard import StepGuard
    from train.step import forward_backward, global_loss, next_micro_batches, optimizer_step

    raw, steps, _, _, _ = counted_run
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
            grad_norm = optimizer_step(strategy)
            assert result.loss == loss and result.grad_norm == grad_norm, (i, result, loss, grad_norm)


def test_one_voice_per_event_the_guard_not_the_loss_alert(counted_run):
    from train.metrics import read_metrics

    _, _, messages, run_dir, _ = counted_run
    assert any(f"skipped step {NAN_STEP} on every rank: loss is nan" in m for m in messages), messages
    assert not any("loss is nan at step" in m for m in messages), messages  # the tracker's old alert
    record = next(r for r in read_metrics(run_dir) if r.get("step") == NAN_STEP and "loss" in r)
    assert record["skipped"] and record["alerts/loss_nonfinite"] == 1  # still counted
