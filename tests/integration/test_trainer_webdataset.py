"""The trainer on real tar shards: uneven shards never hang, and resume is exact."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.helpers import (
    TINY,
    kill_all,
    logged_steps,
    losses,
    run_train,
    start_train,
    wait_for,
)
from tests.support.data import make_shards
from train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 3 uneven shards (5, 1 and 14 documents): ranks x workers > shards, and sizes far apart.
    return make_shards(tmp_path_factory.mktemp("shards"), sizes=(5, 1, 14), vocab_size=256, content="random")


def args(shards, run_dir, steps, workers=1):
    return [*TINY, "data=webdataset", f"data.urls='{shards.urls}'", f"data.num_workers={workers}",
            "data.shuffle_buffer=8", "schedule=constant", f"trainer.max_steps={steps}", f"run.dir={run_dir}",
            "trainer.micro_batch_size=2", "checkpoint.every_steps=5"]


EVAL = ("trainer.eval_every=15", "trainer.eval_batches=2")


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """The 30-step 2-rank run with held-out evaluation: checked by the first test, and the
    reference of the SIGKILL + resume test (one run for both)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = run_train([*args(shards, run_dir, 30), *EVAL], nproc=2, timeout=240)
    (run_dir / "launcher_output.txt").write_text(out.stdout + out.stderr)
    return run_dir


def test_two_ranks_on_three_uneven_shards_finish_multiple_epochs(uninterrupted):
    # 30 steps x 4 sequences x 32 tokens is several passes over ~400 tokens: epochs roll over.
    got = losses(uninterrupted)
    assert sorted(got) == list(range(1, 31))
    assert got[30] < got[1]
    records = read_metrics(uninterrupted)
    last = [r for r in records if "loss" in r][-1]
    assert last["data_epoch"] >= 2, last
    assert "data_wait_frac" in last and 0 <= last["data_wait_frac"] <= 1
    evals = [r for r in records if "eval_loss" in r]
    assert [e["step"] for e in evals] == [15, 30]
    for e in evals:  # held-out loss from the val shards, and its perplexity
        assert e["eval_ppl"] == pytest.approx(__import__("math").exp(e["eval_loss"]))
    # the ranks stop their forkserver workers before they exit: no semaphores left to the resource tracker
    # (which warned "There appear to be 11 leaked semaphore objects" for each rank before)
    output = (uninterrupted / "launcher_output.txt").read_text()
    assert "leaked semaphore" not in output and "step 30" in output, output[-3000:]


def test_sigkill_and_resume_with_webdataset_matches_uninterrupted(shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train([*args(shards, run_dir, 30), *EVAL], nproc=2)
    wait_for(lambda: logged_steps(run_dir) >= 12, proc=proc, what="step 12", timeout=200)
    kill_all(proc)
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 10 <= resumed_from < 30
    run_train([*args(shards, run_dir, 30), *EVAL], nproc=2)
    assert losses(run_dir) == losses(uninterrupted)


def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_loader_workers_start_from_a_forkserver_and_end_with_a_killed_rank(shards, tmp_path):
    """The rank runs threads, so its DataLoader worker is not forked from it (a fork can hang on
    Python 3.11, stream.py): it is a child of a forkserver the rank started. SIGKILL of the rank
    alone leaves none of its helper processes (server, worker, resource tracker) behind."""
    proc, helpers = start_train(args(shards, tmp_path / "run", 10_000), nproc=1), []
    try:
        wait_for(lambda: logged_steps(tmp_path / "run") >= 2, proc=proc, what="step 2", timeout=120)
        rank = psutil.Process(proc.pid)
        helpers = rank.children(recursive=True)
        servers = [p for p in rank.children() if "multiprocessing.forkserver" in " ".join(p.cmdline())]
        assert len(servers) == 1, [p.cmdline() for p in helpers]
        workers = [p for p in helpers if p.ppid() != rank.pid]
        assert [w.ppid() for w in workers] == [servers[0].pid], [p.cmdline() for p in helpers]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: not any(running(p) for p in helpers), timeout=10,
                 what="the killed rank's forkserver, worker and resource tracker to end")
    finally:
        kill_all(proc)
        for p in filter(running, helpers):  # the failure above: leave no orphan behind
            p.kill()
