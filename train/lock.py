"""One run per run directory: a lock file held by rank 0 for the run's life.

A double-submitted job would otherwise interleave its checkpoints and log every step twice.
`flock` is unreliable on shared filesystems (NFS, Lustre), so the lock is a file created with
O_EXCL whose mtime is a heartbeat refreshed by a daemon thread. A lock is stale when its pid is
dead on this host, when its heartbeat is older than `run.lock_stale_s`, or when it belongs to an
earlier attempt of this same SLURM job (a requeue); a stale lock is taken over by renaming it
away (rename of one source succeeds for one contender only) and creating a new one.

The lock file is read back, so it is untrusted: any bytes, a directory or an unreadable file
give a warning and a takeover when old enough, or a `RunLockError` naming the file.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("scaletrain")

LOCK_NAME = "run.lock"
_HELD: list["RunLock"] = []


class RunLockError(RuntimeError):
    """The run directory is held by another run, or its lock file cannot be used."""


def _identity() -> dict[str, Any]:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
            "slurm_restart_count": int(restart) if restart.isdigit() else restart,
            "token": uuid.uuid4().hex}


def _pid_alive(pid: Any) -> bool:
    import psutil

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied: it exists
        return True


def describe(holder: dict[str, Any]) -> str:
    """`host H, pid P, SLURM job J (restart R), started ...` for messages."""
    parts = [f"host {holder.get('host')!s:.100}", f"pid {holder.get('pid')!s:.20}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']!s:.40} (restart {holder.get('slurm_restart_count')!s:.10})")
    start = holder.get("start_time")
    if isinstance(start, (int, float)):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)))
    return ", ".join(parts)


class RunLock:
    """`with RunLock(run_dir, stale_s):` or `acquire()` / `release()`; rank 0 only."""

    def __init__(self, run_dir: Path | str, stale_s: float = 300.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_s = float(stale_s)
        self.me = _identity()
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        """Set by the heartbeat when another run has taken the lock (names the new holder)."""

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, attempts: int = 5) -> None:
        """Create the lock or take over a stale one; raise RunLockError naming a live holder."""
        for _ in range(attempts):
            if self._create():
                self._start_heartbeat()
                return
            self._take_over_if_stale()
        raise RunLockError(f"could not take the run lock {self.path}: other runs keep taking it; "
                           "make sure only one job uses this run.dir")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunLockError(f"cannot create the run lock {self.path}: {e.strerror}; "
                               "choose a writable run.dir") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk, say: leave no half-written lock behind
            self.path.unlink(missing_ok=True)
            raise RunLockError(f"cannot write the run lock {self.path}: {e.strerror}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        return True

    def _take_over_if_stale(self) -> None:
        """Return after moving a stale lock away (or finding it gone); raise if it is live."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        holder, problem = read_lock(self.path)
        if problem == "it is a directory":  # never ours to delete
            raise RunLockError(f"run lock {self.path} is a directory, not a lock file: move it out of "
                               f"{self.path.parent} (the trainer writes its lock there)")
        age = time.time() - st.st_mtime
        reason = self._stale_reason(holder, age)
        if reason is None:
            raise RunLockError(self._held_message(holder, problem, age))
        away = self.path.with_name(f".{LOCK_NAME}.stale-{self.me['token']}")
        try:
            os.rename(self.path, away)
        except FileNotFoundError:
            return  # another contender moved it first; try to create again
        except OSError as e:
            raise RunLockError(f"cannot take over the stale run lock {self.path}: {e.strerror}; "
                               f"remove it by hand if no run uses {self.path.parent}") from None
        moved = os.lstat(away)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino) or read_lock(away) != (holder, problem):
            # a new lock appeared between our look and the rename: give it back (never over a third one)
            try:
                os.link(away, self.path)
                os.unlink(away)
            except OSError:
                pass
            return
        log.warning("run lock %s: taking over from %s (%s)", self.path,
                    describe(holder) if holder else f"an unusable lock file ({problem})", reason)
        away.unlink(missing_ok=True)

    def _stale_reason(self, holder: dict | None, age: float) -> str | None:
        if age > self.stale_s:
            return f"heartbeat {age:.0f} s old > run.lock_stale_s={self.stale_s:g}"
        if holder is None:
            return None
        job = self.me["slurm_job_id"]
        same_host = holder.get("host") == self.me["host"]
        if same_host and not _pid_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} is no longer running on this host"
        attempt = holder.get("slurm_restart_count") != self.me["slurm_restart_count"]
        if job and holder.get("slurm_job_id") == job and (attempt or not same_host):
            return f"a requeued attempt of SLURM job {job}"
        return None

    def _held_message(self, holder: dict | None, problem: str | None, age: float) -> str:
        run_dir = self.path.parent
        if holder is None:
            return (f"run lock {self.path} is unusable ({problem}) and was changed {age:.0f} s ago, so a run "
                    f"may be using {run_dir}. If none is, delete {self.path}; it is also taken over by itself "
                    f"once older than run.lock_stale_s={self.stale_s:g} s")
        return (f"run.dir {run_dir} is in use by another run ({describe(holder)}; heartbeat {age:.0f} s ago; "
                f"lock file {self.path}). Two runs on one run dir would interleave their checkpoints: wait "
                f"for it to finish, stop it (touch {run_dir}/STOP), or choose another run.dir. A dead run's "
                f"lock is taken over once its heartbeat is older than run.lock_stale_s={self.stale_s:g} s")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        _HELD.append(self)

    def _ours(self) -> bool:
        """The lock file is still the one we created (an inode number alone can be reused)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        holder, _ = read_lock(self.path)
        return (st.st_dev, st.st_ino) == self._inode and bool(holder) and holder.get("token") == self.me["token"]

    def _beat(self) -> None:
        interval = max(0.05, min(30.0, self.stale_s / 4))
        while not self._stop.wait(interval):
            if not self._ours():
                holder, _ = read_lock(self.path)
                self.lost = describe(holder) if holder else "nobody"
                log.error("run lock %s was taken over (now held by %s); this run stops at the next step",
                          self.path, self.lost)
                return
            try:
                os.utime(self.path)
            except OSError as e:  # a transient filesystem error: the next beat tries again
                log.warning("run lock %s: heartbeat failed (%s)", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._inode is not None and self._ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._inode = None
        if self in _HELD:
            _HELD.remove(self)


def release_all() -> None:
    """Release every lock this process holds (for exits that skip atexit, such as os._exit)."""
    for lock in list(_HELD):
        lock.release()


def read_lock(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The holder recorded in a lock file, or (None, what is wrong with it)."""
    try:
        data = path.read_bytes()[:65536]
    except IsADirectoryError:
        return None, "it is a directory"
    except FileNotFoundError:
        return None, "it is gone"
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, f"{len(data)} bytes that are not a JSON lock record"
    if not isinstance(holder, dict):
        return None, "not a JSON object"
    return holder, None



def acquire_run_lock(run_dir: Path, stale_s: float, is_main: bool) -> RunLock | None:
    """Rank 0 creates the run dir and takes its lock; every rank learns the outcome (one broadcast),
    so that all fail together, before any of them writes anything, when another run holds it."""
    from train import dist as d

    lock, error = None, None
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir, stale_s)
            lock.acquire()
        except RunLockError as e:
            lock, error = None, str(e)
        except OSError as e:
            error = f"cannot create run.dir {run_dir}: {e}; choose a writable run.dir"
    error = d.broadcast_object(error)
    if error:
        d.shutdown()
        raise RunLockError(error)
    return lock
