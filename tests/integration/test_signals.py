"""Signals and hangs: a stale STOP file, Ctrl-C once and twice, a dead launcher, a stopped rank.

Real processes throughout: the trainer under torchrun on 2 gloo ranks where it is about ranks,
real signals sent with os.kill.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import psutil
import pytest

from tests.helpers import (
    PY,
    REPO,
    TINY,
    child_env,
    kill_all,
    logged_steps,
    start_train,
    wait_for,
)
from train import signals
from train.lock import LOCK_NAME, RunLock
from train.signals import StopRequest

BASE = [*TINY, "strategy=ddp", "trainer.max_steps=100000", "checkpoint.every_steps=0"]


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    def found():
        procs = [c for c in psutil.Process(launcher.pid).children(recursive=True)
                 if "torch.distributed.run" not in " ".join(c.cmdline())]
        return {int(p.environ()["RANK"]): p for p in procs if "RANK" in p.environ()}
    wait_for(lambda: len(found()) == 2, timeout=60, what="two ranks")
    return found()


@pytest.fixture
def own_handlers():
    """StopRequest installs signal handlers: give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_only_rank_0_looks_for_the_stop_file_and_not_every_step(tmp_path, monkeypatch, own_handlers):
    monkeypatch.setattr(signals, "STOP_CHECK_S", 0.5)
    main, other = StopRequest(tmp_path, is_main=True), StopRequest(tmp_path, is_main=False)
    assert not main.local()  # looked: no file; the next look is due in 0.5 s
    (tmp_path / "STOP").touch()
    assert not main.local() and not other.local()
    wait_for(main.local, timeout=5, what="rank 0 to see STOP")
    assert not other.local() and main.reason() == f"{tmp_path / 'STOP'} present"


def test_a_lost_run_lock_stops_the_run(tmp_path, own_handlers):
    with RunLock(tmp_path, stale_s=0.2) as lock:
        stop = StopRequest(tmp_path, is_main=True, lock=lock)
        assert not stop.local()
        (tmp_path / LOCK_NAME).unlink()  # as another run's takeover would move it away
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node9", "pid": 7}))
        wait_for(stop.local, timeout=10, what="the lost lock to stop the run")
        assert stop.reason() == "the run lock was taken over by host node9, pid 7"


def test_a_stop_file_from_before_the_run_is_removed_then_ctrl_c_stops_cleanly(tmp_path):
    (tmp_path / "STOP").touch()  # left over from an earlier run
    os.utime(tmp_path / "STOP", (time.time() - 60, time.time() - 60))
    proc = start_train([*BASE, f"run.dir={tmp_path}"])
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, proc=proc, what="step 3 despite the old STOP")
        assert not (tmp_path / "STOP").exists()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert f"{tmp_path / 'STOP'} predates this run (left over from an earlier one): removed" in out
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGINT)" in out and "Ctrl-C again aborts at once" in out
    assert _latest(tmp_path) == f"step_{logged_steps(tmp_path):08d}"


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from train.signals import StopRequest
        stop = StopRequest(Path({str(tmp_path)!r}), is_main=False)
        os.kill(os.getpid(), signal.SIGINT)
        while stop.signal_name is None:
            time.sleep(0.01)
        print("first Ctrl-C: stopping gracefully", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("still running", flush=True)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([PY, "-c", script], cwd=REPO, env=child_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert "first Ctrl-C: stopping gracefully" in proc.stdout and "still running" not in proc.stdout
    assert proc.returncode == -signal.SIGINT and time.monotonic() - t0 < 30


def test_sigusr2_prints_every_threads_stack_and_the_process_goes_on():
    script = textwrap.dedent("""
        import os, signal, threading, time
        from train.signals import enable_stack_dumps
        enable_stack_dumps()
        threading.Thread(target=time.sleep, args=(30,), name="sleeper", daemon=True).start()
        os.kill(os.getpid(), signal.SIGUSR2)
        print("went on", flush=True)
    """)
    proc = subprocess.run([PY, "-c", script], cwd=REPO, env=child_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "went on\n", proc.stderr
    main, other = proc.stderr.split("Current thread 0x")[::-1]
    assert 'File "<string>", line 6 in <module>' in main  # the os.kill line: where the main thread was
    assert other.startswith("Thread 0x") and "threading.py" in other  # the sleeper's stack too


def test_ranks_whose_launcher_died_checkpoint_and_exit(tmp_path):
    """torchrun dies on SIGUSR1 (it does not forward it); its ranks, in sessions of their own, see
    their parent change, agree to stop, checkpoint the same step and exit."""
    proc = start_train([*BASE, f"run.dir={tmp_path}"], nproc=2)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, proc=proc, what="step 2")
        ranks = _ranks(proc)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGUSR1  # the launcher is gone, the ranks are not (yet)
        _, alive = psutil.wait_procs(list(ranks.values()), timeout=120)
        assert not alive, "orphaned ranks kept training"
        out = proc.stdout.read()
    finally:
        kill_all(proc)
    assert out.count("stop requested (the launcher (parent pid") == 2, out[-3000:]
    step = logged_steps(tmp_path)
    assert _latest(tmp_path) == f"step_{step:08d}"
    state = json.loads((tmp_path / "checkpoints" / _latest(tmp_path) / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2


@pytest.mark.timeout(300)
def test_a_stopped_rank_ends_the_job_within_dist_timeout_naming_step_and_rank(tmp_path):
    proc = start_train([*BASE, f"run.dir={tmp_path}", "dist.timeout_s=4"], nproc=2)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, proc=proc, what="step 2")
        ranks = _ranks(proc)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_after = logged_steps(tmp_path)
        t0 = time.monotonic()
        gone, _ = psutil.wait_procs([ranks[0]], timeout=120)
        waited = time.monotonic() - t0
        assert gone, "rank 0 kept waiting for the stopped rank"
    finally:
        kill_all(proc)  # torchrun would give the stopped rank 30 s to answer SIGTERM first
    out = proc.stdout.read()
    assert "a collective timed out after dist.timeout_s=4 s in step" in out, out[-3000:]
    step = int(out.split("dist.timeout_s=4 s in step ")[1].split(":")[0])
    # the metrics file may trail rank 0 by a step, and rank 1 may finish one more before SIGSTOP lands
    assert stopped_after <= step <= stopped_after + 2
    assert "rank(s) 1 did not arrive" in out and "Traceback" not in out.split("timed out after")[0][-3000:]
    assert 4 <= waited < 60
    assert not (tmp_path / LOCK_NAME).exists()  # released on the way out
