"""The run-dir lock (train/lock.py): one run per run dir, stale locks taken over, the lock file untrusted.

Unit tests drive RunLock in this process against lock files written as another run (or garbage)
would leave them; the end-to-end tests start real trainers on one run dir.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY, kill_all, logged_steps, run_train, start_train, wait_for
from train.lock import LOCK_NAME, RunLock, RunLockError, read_lock


def _write_holder(run_dir, age_s: float = 0.0, **fields) -> dict:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time() - 100,
              "slurm_job_id": None, "slurm_restart_count": 0, "token": "theirs", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)


def test_lock_records_the_holder_and_is_removed_on_release(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with RunLock(tmp_path, stale_s=60) as lock:
        holder, problem = read_lock(tmp_path / LOCK_NAME)
        assert problem is None and lock.lost is None
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["slurm_job_id"] == "4242" and holder["slurm_restart_count"] == 3
        assert abs(holder["start_time"] - time.time()) < 60
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_is_named_and_its_lock_kept(tmp_path):
    holder = _write_holder(tmp_path, host="node17", pid=12345, slurm_job_id="777")
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(RunLockError) as e:
        RunLock(tmp_path, stale_s=60).acquire()
    msg = str(e.value)
    assert "in use by another run" in msg and "host node17" in msg and "pid 12345" in msg
    assert "SLURM job 777" in msg and str(tmp_path / LOCK_NAME) in msg and "run.lock_stale_s=60" in msg
    assert (tmp_path / LOCK_NAME).read_bytes() == before and holder["token"] == "theirs"


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    with RunLock(tmp_path, stale_s=0.4):
        path = tmp_path / LOCK_NAME
        os.utime(path, (time.time() - 100, time.time() - 100))
        wait_for(lambda: time.time() - path.stat().st_mtime < 5, timeout=10, what="a heartbeat")
        with pytest.raises(RunLockError, match="in use by another run"):
            RunLock(tmp_path, stale_s=0.4).acquire()  # same host, live pid, fresh heartbeat


@pytest.mark.parametrize("case", ["dead pid", "old heartbeat", "slurm requeue", "slurm requeue other host"])
def test_stale_locks_are_taken_over_with_a_warning(case, tmp_path, monkeypatch, caplog):
    if case == "dead pid":
        _write_holder(tmp_path, pid=_dead_pid())
        expected = "is no longer running on this host"
    elif case == "old heartbeat":
        _write_holder(tmp_path, host="elsewhere", age_s=120)
        expected = "heartbeat 120 s old > run.lock_stale_s=60"
    else:  # the same job requeued by SLURM: its earlier attempt cannot be running any more
        monkeypatch.setenv("SLURM_JOB_ID", "555")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        if case == "slurm requeue":
            _write_holder(tmp_path, slurm_job_id="555", slurm_restart_count=0)  # our own (live) pid
        else:
            _write_holder(tmp_path, host="node3", pid=1, slurm_job_id="555", slurm_restart_count=1)
        expected = "a requeued attempt of SLURM job 555"
    with caplog.at_level(logging.WARNING, logger="scaletrain"), RunLock(tmp_path, stale_s=60) as lock:
        assert read_lock(tmp_path / LOCK_NAME)[0]["token"] == lock.me["token"]
    assert "taking over" in caplog.text and expected in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def test_another_slurm_job_does_not_take_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "556")
    _write_holder(tmp_path, host="node3", pid=1, slurm_job_id="555")
    with pytest.raises(RunLockError, match="SLURM job 555"):
        RunLock(tmp_path, stale_s=60).acquire()


GARBAGE = {"binary": b"\x00\xff\xfe\x80garbage\x00", "empty": b"", "json list": b"[1, 2, 3]",
           "wrong types": b'{"host": 5, "pid": "x", "start_time": "yesterday", "slurm_job_id": [1]}',
           "latin-1": "h\u00f4te".encode("latin-1")}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_lock_files_give_a_clear_error_or_a_takeover(name, tmp_path, caplog):
    path = tmp_path / LOCK_NAME
    path.write_bytes(GARBAGE[name])
    with pytest.raises(RunLockError) as e:  # fresh: possibly a run writing it right now
        RunLock(tmp_path, stale_s=60).acquire()
    assert str(path) in str(e.value) and ("unusable" in str(e.value) or "in use" in str(e.value))
    os.utime(path, (time.time() - 300, time.time() - 300))
    with caplog.at_level(logging.WARNING, logger="scaletrain"), RunLock(tmp_path, stale_s=60):
        assert read_lock(path)[1] is None
    assert "taking over" in caplog.text


def test_a_directory_in_place_of_the_lock_is_named_and_kept(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    (tmp_path / LOCK_NAME / "mine.txt").write_text("user data")
    with pytest.raises(RunLockError, match="is a directory"):
        RunLock(tmp_path, stale_s=0.001).acquire()
    assert (tmp_path / LOCK_NAME / "mine.txt").read_text() == "user data"


def test_a_lock_taken_over_under_a_live_run_is_noticed(tmp_path):
    lock = RunLock(tmp_path, stale_s=0.2)
    lock.acquire()
    try:
        (tmp_path / LOCK_NAME).unlink()  # as a takeover would move it away
        _write_holder(tmp_path, host="intruder", pid=99)
        wait_for(lambda: lock.lost is not None, timeout=10, what="the lost lock")
        assert "host intruder" in lock.lost
    finally:
        lock.release()
    assert read_lock(tmp_path / LOCK_NAME)[0]["host"] == "intruder"  # not ours to remove


# ---- real trainers on one run dir ------------------------------------------------------------

BASE = [*TINY, "strategy=ddp", "trainer.max_steps=100000", "checkpoint.every_steps=0"]


def test_second_run_on_a_run_dir_fails_naming_the_holder_and_touches_nothing(tmp_path):
    first = start_train([*BASE, f"run.dir={tmp_path}"])
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, proc=first, what="step 2 of the first run")
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != LOCK_NAME}
        second = run_train([*BASE, f"run.dir={tmp_path}", "trainer.max_steps=3"], nproc=2, check=False)
        assert second.returncode != 0
        err = second.stderr
        assert f"run.dir {tmp_path} is in use by another run" in err and f"pid {holder['pid']}" in err
        assert f"host {holder['host']}" in err and "Traceback" not in err.split("error: ")[0][-2000:]
        assert err.count("error: run.dir") == 1  # rank 0 says it; rank 1 fails with it, silently
        assert all(p.stat().st_mtime_ns == m for p, m in files.items() if p.name != "metrics.jsonl")
        (tmp_path / "STOP").touch()
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            kill_all(first)
    assert first.returncode == 0, out[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(1, len(steps) + 1))  # no step logged twice
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_sigkilled_runs_lock_is_taken_over(tmp_path):
    first = start_train([*BASE, f"run.dir={tmp_path}"])
    wait_for(lambda: logged_steps(tmp_path) >= 1, proc=first, what="step 1")
    kill_all(first)
    dead = json.loads((tmp_path / LOCK_NAME).read_text())
    out = run_train([*BASE, f"run.dir={tmp_path}", "trainer.max_steps=2"])
    log = out.stdout + out.stderr
    assert "taking over" in log and f"pid {dead['pid']} is no longer running on this host" in log
    assert not (tmp_path / LOCK_NAME).exists()


def test_garbage_lock_through_the_cli_is_a_clear_error(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff")
    out = run_train([*BASE, f"run.dir={tmp_path}", "trainer.max_steps=1"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"run lock {tmp_path / LOCK_NAME} is unusable" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
