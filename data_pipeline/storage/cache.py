"""The per-node shard cache: one copy per node, bounded by data.cache_limit, never half-read.

Every rank and DataLoader worker of a node opens the same directory; they coordinate only
through the file system (no process group is needed, the cache works before one exists):

- `<key>.tar` is a complete, verified shard; it only ever appears by rename from `<key>.part`.
- `<key>.lock` (flock, exclusive) is held while downloading: the other processes wait on it
  and then find the shard, so a node fetches each shard once.
- `<key>.pin` (flock, shared) is held by every process reading or about to read the shard;
  eviction takes it exclusively without blocking, so a pinned shard is never evicted.
- `cache.lock` (flock, exclusive) serialises the space accounting: a download reserves its
  full size (the `.part` file is truncated to it up front) and evicts the least recently
  used unpinned shards until the cache fits under the limit; renames and deletions happen
  under it too, so a listing taken under it is exact.

flock locks die with their process, so a killed rank leaves no stale lock; a `.part` whose
`.lock` nobody holds is a dead download and is deleted when space is needed.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Callable

LOCAL_SHARD = ".tar"


class CacheError(RuntimeError):
    """A downloaded shard does not match the manifest (after one more try)."""


def default_cache_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "scaletrain-shards")


def cache_key(url: str) -> str:
    """Stable, file-system-safe name: hash of the URL plus its readable basename."""
    base = url.rstrip("/").rsplit("/", 1)[-1][-60:]
    return hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + "".join(
        c if c.isalnum() or c in "-_." else "_" for c in base)


def cache_dir_problem(root: str) -> str | None:
    """None when a shard can be written under `root` (created if missing), probed by writing a
    file there; otherwise what stops it, naming data.cache_dir."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        return (f"data.cache_dir={root!r} is not a writable directory ({e.strerror or e}): set data.cache_dir "
                "to a writable directory on node-local disk")
    return None


class _Flock:
    def __init__(self, path: Path, mode: int) -> None:
        self.path, self.mode, self.fd = path, mode, -1

    def __enter__(self) -> "_Flock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, self.mode)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class ShardCache:
    """A directory of verified shards under `limit` bytes, shared by the processes of a node."""

    def __init__(self, root: str, limit: int) -> None:
        self.root = Path(root or default_cache_dir())
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._pins: dict[str, int] = {}
        self.downloads = 0

    def path(self, url: str) -> Path:
        return self.root / (cache_key(url) + LOCAL_SHARD)

    def _aux(self, url: str, ext: str) -> Path:
        return self.root / (cache_key(url) + ext)

    def pin(self, url: str) -> None:
        """Mark url as in use by this process (until unpin); touches it for LRU order."""
        if url in self._pins:
            return
        fd = os.open(self._aux(url, ".pin"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._pins[url] = fd
        try:
            os.utime(self.path(url))
        except FileNotFoundError:
            pass

    def unpin(self, url: str) -> None:
        fd = self._pins.pop(url, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for url in list(self._pins):
            self.unpin(url)

    def ensure(self, url: str, size: int, sha256: str | None,
               fetch: Callable[[str, IO[bytes]], str]) -> Path:
        """The local path of url's verified copy, downloading it (once per node) if needed.

        fetch(url, file) writes the body and returns its sha256. A copy with the wrong size or
        hash is fetched once more, then CacheError (the caller applies data.on_error).
        """
        dest = self.path(url)
        if dest.is_file():
            return dest
        with _Flock(self._aux(url, ".lock"), fcntl.LOCK_EX):
            if dest.is_file():  # another process of this node fetched it while we waited
                return dest
            problem = ""
            for _ in range(2):
                problem = self._download(url, dest, size, sha256, fetch)
                if not problem:
                    self.downloads += 1
                    return dest
            raise CacheError(f"shard {url} {problem}, fetched twice: rerun `python -m data_pipeline.prepare "
                             "force=true` to rewrite it and its manifest")

    def _download(self, url: str, dest: Path, size: int, sha256: str | None,
                  fetch: Callable[[str, IO[bytes]], str]) -> str:
        part = dest.with_suffix(".part")
        self._reserve(part, size)
        try:
            with open(part, "r+b") as f:
                digest = fetch(url, f)
                got = f.tell()
                f.truncate(got)
            if got != size:
                return f"has {got} bytes but the manifest says {size}"
            if sha256 and digest != sha256:
                return f"has sha256 {digest} but the manifest says {sha256} (its bytes changed after the manifest was written)"
            with _Flock(self.root / "cache.lock", fcntl.LOCK_EX):  # accounting sees one name
                os.replace(part, dest)
            return ""
        finally:
            part.unlink(missing_ok=True)

    def _reserve(self, part: Path, size: int) -> None:
        """Make room for `size` bytes and claim it (the .part file has that size from now on)."""
        with _Flock(self.root / "cache.lock", fcntl.LOCK_EX):
            used = self._evict(size)
            if used + size > self.limit:
                warnings.warn(f"data.cache_limit={self.limit} bytes: {used} bytes of shards in "
                              f"{self.root} are in use and the next needs {size}; going over the "
                              "limit (raise data.cache_limit or lower data.prefetch_shards)",
                              RuntimeWarning, stacklevel=4)
            with open(part, "wb") as f:
                f.truncate(size)

    def _evict(self, need: int) -> int:
        """Delete dead downloads, then least recently used unpinned shards, until `need` fits;
        returns the bytes still used."""
        entries = []
        used = 0
        for p in self.root.iterdir():
            if p.suffix not in (LOCAL_SHARD, ".part"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.suffix == ".part" and self._try_remove(p, ".lock"):
                continue
            used += st.st_size
            if p.suffix == LOCAL_SHARD:
                entries.append((st.st_mtime, st.st_size, p))
        for _, nbytes, p in sorted(entries):
            if used + need <= self.limit:
                break
            if self._try_remove(p, ".pin"):
                used -= nbytes
        return used

    def _try_remove(self, p: Path, guard_ext: str) -> bool:
        """Remove p if nobody holds its guard lock (pin or download lock)."""
        fd = os.open(p.with_suffix(guard_ext), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            p.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return True

    def used_bytes(self) -> int:
        """Bytes of shards and downloads in progress (under the lock: a consistent listing)."""
        with _Flock(self.root / "cache.lock", fcntl.LOCK_EX):
            total = 0
            for p in self.root.iterdir():
                if p.suffix in (LOCAL_SHARD, ".part"):
                    try:
                        total += p.stat().st_size
                    except FileNotFoundError:
                        pass
            return total
