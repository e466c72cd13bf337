"""Object storage behind one small interface: local files, http(s), s3 (boto3) and fsspec.

The loader needs four things of a store: read a small object (manifest, indexes), stream a
large one into a file (a shard, resumable by byte range), its size (start-up probe, prepare's
no-op check) and, for prepare, upload. Transient failures (HTTP 5xx/429/408, connection
reset, timeout) are retried with exponential backoff; after the last try the error names the
URL and the HTTP status. Credentials are never read here: boto3's standard chain (environment,
config files, instance roles) and fsspec's own configuration supply them.
"""
from __future__ import annotations

import http.client
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, TypeVar

REMOTE_SCHEMES = ("s3", "http", "https")
CHUNK = 1 << 20
T = TypeVar("T")


@dataclass
class StorageConfig:
    """Where remote shards live (credentials never come from here: see module docstring)."""

    endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, Ceph, ...); empty = $AWS_ENDPOINT_URL or AWS itself."""
    timeout_s: float = 10.0
    """Connect/read timeout of one request, and of the start-up probe."""


class FetchError(RuntimeError):
    """A request failed for good (after the retries): names the URL and the HTTP status."""

    def __init__(self, url: str, status: int | None, detail: str, tries: int = 1):
        self.url, self.status = url, status
        what = f"HTTP {status}" if status else "no HTTP status"
        super().__init__(f"{url}: {what} ({detail}) after {tries} tr{'y' if tries == 1 else 'ies'}")


class DataSourceLost(RuntimeError):
    """The loader gave up on a source mid-run (its retries are exhausted): the trainer stops with a
    checkpoint instead of crashing. `url` and `error` ("HTTP 503 (...) after 6 tries") survive a
    DataLoader worker: torch re-raises a worker's exception as `type(e)(its traceback text)`, and
    that text ends with this exception's own line, which is parsed back here."""

    PREFIX = "lost the data source "

    def __init__(self, url: str, error: str | None = None):
        if error is None:  # re-raised from a DataLoader worker: take the fields from its last line
            tail = next((line for line in reversed(url.splitlines()) if self.PREFIX in line), "")
            url, _, error = tail.split(self.PREFIX, 1)[-1].partition(": ")
        self.url, self.error = url, error
        super().__init__(f"{self.PREFIX}{url}: {error}")

    @classmethod
    def from_fetch(cls, e: "FetchError") -> "DataSourceLost":
        return cls(e.url, str(e)[len(e.url) + 2:] if str(e).startswith(e.url + ": ") else str(e))


class _Transient(Exception):
    """A failure worth retrying; carries the status for the final message."""

    def __init__(self, status: int | None, detail: str):
        self.status, self.detail = status, detail
        super().__init__(detail)


def scheme(url: str) -> str:
    """`s3`, `http`, ... or `file` for local paths (and file:// URLs)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return m.group(1).lower() if m else ("pipe" if url.startswith("pipe:") else "file")


def is_remote(url: str) -> bool:
    return scheme(url) not in ("file", "pipe")


def join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel.lstrip("/")


def parse_size(text: str | int) -> int:
    """`50GB`, `800KB`, `1.5GiB`, `1000` (bytes) -> bytes; ValueError names the value."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(I?B?)\s*", str(text).upper())
    if not m or (m.group(3) == "I"):
        raise ValueError(f"{text!r} is not a size: use e.g. 50GB, 800KB, 1.5GiB or a byte count")
    base = 1024 if m.group(3) == "IB" else 1000
    return int(float(m.group(1)) * base ** " KMGTP".index(m.group(2) or " "))


def retrying(fn: Callable[[], T], url: str, retries: int, backoff_s: float) -> T:
    """fn() with up to `retries` retries of _Transient failures, sleeping backoff_s * 2**i."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Transient as e:
            if attempt == retries:
                raise FetchError(url, e.status, e.detail, attempt + 1) from None
            time.sleep(backoff_s * (2 ** attempt))
    raise AssertionError("unreachable")


class Store:
    """One scheme's operations; subclasses raise _Transient, FetchError or FileNotFoundError."""

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg

    def read(self, url: str) -> bytes:
        raise NotImplementedError

    def size(self, url: str) -> int | None:
        """Bytes of the object, None when it does not exist."""
        raise NotImplementedError

    def stream(self, url: str, start: int) -> IO[bytes]:
        """A readable body from byte `start` on (the server must honour the range)."""
        raise NotImplementedError

    def listing(self, prefix: str) -> dict[str, int] | None:
        """{url: size} of every object under prefix in one call where the store can; else None."""
        return None

    def put(self, path: Path, url: str) -> None:
        raise FetchError(url, None, f"{scheme(url)}:// is read-only here: write to s3:// or a local path")


class LocalStore(Store):
    def _p(self, url: str) -> Path:
        return Path(url[len("file://"):] if url.startswith("file://") else url)

    def read(self, url: str) -> bytes:
        return self._p(url).read_bytes()

    def size(self, url: str) -> int | None:
        p = self._p(url)
        return p.stat().st_size if p.is_file() else None

    def stream(self, url: str, start: int) -> IO[bytes]:
        f = open(self._p(url), "rb")
        f.seek(start)
        return f

    def put(self, path: Path, url: str) -> None:
        self._p(url).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self._p(url))


class HttpStore(Store):
    """Plain http(s) with Range requests (urllib: no dependency, and every server speaks it)."""

    def _open(self, url: str, method: str = "GET", start: int = 0):
        req = urllib.request.Request(url, method=method)
        if start:
            req.add_header("Range", f"bytes={start}-")
        try:
            resp = urllib.request.urlopen(req, timeout=self.cfg.timeout_s)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{url}: HTTP 404 (not found)") from None
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(e.code, e.reason) from None
            raise FetchError(url, e.code, str(e.reason)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Transient(None, str(getattr(e, "reason", e))) from None
        if start and resp.status == 200:  # a server without Range support: skip what we have
            left = start
            while left > 0:
                block = resp.read(min(left, CHUNK))
                if not block:
                    raise _Transient(200, f"body ended before byte {start}")
                left -= len(block)
            resp.headers.replace_header("Content-Length", str(int(resp.headers["Content-Length"]) - start))
        return resp

    def read(self, url: str) -> bytes:
        with self._open(url) as resp:
            return _read_all(resp)

    def size(self, url: str) -> int | None:
        try:
            with self._open(url, "HEAD") as resp:
                return int(resp.headers.get("Content-Length", -1))
        except FileNotFoundError:
            return None

    def stream(self, url: str, start: int) -> IO[bytes]:
        return _CheckedBody(self._open(url, start=start))


class _CheckedBody:
    """http.client returns b"" when a connection closes before Content-Length (it keeps that
    for compatibility); a shard body cut short must be an error so that it is resumed."""

    def __init__(self, resp) -> None:
        self.resp = resp
        self.left = int(resp.headers.get("Content-Length", -1))

    def read(self, n: int) -> bytes:
        block = self.resp.read(n)
        if not block and self.left > 0:
            raise http.client.IncompleteRead(b"", self.left)
        self.left -= len(block)
        return block

    def close(self) -> None:
        self.resp.close()


class S3Store(Store):
    """boto3 client; botocore's own retries are off so that data.retries is the one knob."""

    def __init__(self, cfg: StorageConfig) -> None:
        super().__init__(cfg)
        import boto3
        from botocore.config import Config

        kw = {"endpoint_url": cfg.endpoint_url} if cfg.endpoint_url else {}
        self.client = boto3.session.Session().client(
            "s3", config=Config(retries={"total_max_attempts": 1}, connect_timeout=cfg.timeout_s,
                                read_timeout=cfg.timeout_s, max_pool_connections=32), **kw)

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        bucket, _, key = url[len("s3://"):].partition("/")
        return bucket, key

    def _call(self, url: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return fn()
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{url}: HTTP 404 ({code})") from None
            if status and (status >= 500 or status in (408, 429)):
                raise _Transient(status, code) from None
            raise FetchError(url, status, code or str(e)) from None
        except (BotoConnectionError, HTTPClientError, OSError) as e:
            raise _Transient(None, f"{type(e).__name__}: {e}") from None
        except BotoCoreError as e:  # no credentials, bad region...: retrying cannot help
            raise FetchError(url, None, f"{type(e).__name__}: {e}") from None

    def read(self, url: str) -> bytes:
        b, k = self._split(url)
        return self._call(url, lambda: _read_all(self.client.get_object(Bucket=b, Key=k)["Body"]))

    def size(self, url: str) -> int | None:
        b, k = self._split(url)
        try:
            return self._call(url, lambda: self.client.head_object(Bucket=b, Key=k)["ContentLength"])
        except FileNotFoundError:
            return None

    def stream(self, url: str, start: int) -> IO[bytes]:
        b, k = self._split(url)
        kw = {"Range": f"bytes={start}-"} if start else {}
        return self._call(url, lambda: self.client.get_object(Bucket=b, Key=k, **kw)["Body"])

    def listing(self, prefix: str) -> dict[str, int] | None:
        b, k = self._split(prefix)

        def go() -> dict[str, int]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k)
            return {f"s3://{b}/{o['Key']}": o["Size"] for page in pages for o in page.get("Contents", [])}
        return self._call(prefix, go)

    def put(self, path: Path, url: str) -> None:
        b, k = self._split(url)
        self._call(url, lambda: self.client.upload_file(str(path), b, k))


class FsspecStore(Store):
    """gs://, az://, hf-free others: whatever fsspec has a backend for (its own credentials)."""

    def __init__(self, cfg: StorageConfig, proto: str) -> None:
        super().__init__(cfg)
        import fsspec

        self.fs = fsspec.filesystem(proto)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, TimeoutError) as e:
            raise _Transient(None, f"{type(e).__name__}: {e}") from None

    def read(self, url: str) -> bytes:
        return self._call(lambda: self.fs.cat_file(url))

    def size(self, url: str) -> int | None:
        try:
            return self._call(lambda: self.fs.size(url))
        except FileNotFoundError:
            return None

    def stream(self, url: str, start: int) -> IO[bytes]:
        def go():
            f = self.fs.open(url, "rb")
            f.seek(start)
            return f
        return self._call(go)

    def put(self, path: Path, url: str) -> None:
        self._call(lambda: self.fs.put_file(str(path), url))


def _read_all(body) -> bytes:
    try:
        return body.read()
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(None, f"{type(e).__name__}: {e}") from None


def backend_problem(url: str) -> str | None:
    """Why `url`'s scheme cannot be used here (None = it can)."""
    s = scheme(url)
    if s in ("file", "pipe", "http", "https"):
        return None
    if s == "s3":
        try:
            import boto3  # noqa: F401
        except ImportError:
            return "s3:// needs boto3: pip install boto3"
        return None
    try:
        import fsspec
    except ImportError:
        return f"{s}:// needs fsspec with its backend: pip install fsspec (and e.g. gcsfs for gs://)"
    if s not in fsspec.available_protocols():
        return f"unknown scheme {s}://: use a local path, s3://, http(s):// or an fsspec protocol"
    try:
        fsspec.get_filesystem_class(s)
    except (ImportError, ValueError) as e:
        return f"{s}:// needs its fsspec backend: {e}"
    return None


_STORES: dict[tuple, Store] = {}


def store_for(url: str, cfg: StorageConfig) -> Store:
    """The (per process, cached) store for url's scheme."""
    s = scheme(url)
    key = (s, cfg.endpoint_url, cfg.timeout_s)
    if key not in _STORES:
        if s == "file":
            _STORES[key] = LocalStore(cfg)
        elif s in ("http", "https"):
            _STORES[key] = HttpStore(cfg)
        elif s == "s3":
            _STORES[key] = S3Store(cfg)
        else:
            problem = backend_problem(url)
            if problem:
                raise ValueError(f"{url}: {problem}")
            _STORES[key] = FsspecStore(cfg, s)
    return _STORES[key]


def probe(url: str, cfg: StorageConfig, retries: int = 0, backoff_s: float = 0.0) -> str | None:
    """HEAD `url` with the timeout, retried (start-up check): None when it exists, else why not."""
    problem = backend_problem(url)
    if problem:
        return problem
    try:
        store = store_for(url, cfg)
        found = retrying(lambda: store.size(url), url, retries, backoff_s)
    except FetchError as e:
        return f"unreachable: {e}"
    except ValueError as e:
        return str(e)
    return None if found is not None else f"{url} does not exist (HTTP 404)"


def fetch_into(url: str, f: IO[bytes], cfg: StorageConfig, retries: int, backoff_s: float) -> str:
    """Stream `url` into the open file `f` (from its start); returns the sha256 of what was
    written. A body cut short is resumed by a Range request from the last byte written."""
    import hashlib

    store = store_for(url, cfg)
    state = {"h": hashlib.sha256(), "n": 0}

    def attempt() -> None:
        body = store.stream(url, state["n"])
        try:
            while True:
                try:
                    block = body.read(CHUNK)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    raise _Transient(None, f"body cut at byte {state['n']}: {type(e).__name__}: {e}") from None
                except Exception as e:  # botocore's streaming errors share no base with OSError
                    if type(e).__module__.startswith(("botocore", "urllib3")):
                        raise _Transient(None, f"body cut at byte {state['n']}: {e}") from None
                    raise
                if not block:
                    return
                f.write(block)
                state["h"].update(block)
                state["n"] += len(block)
        finally:
            body.close()

    retrying(attempt, url, retries, backoff_s)
    return state["h"].hexdigest()
