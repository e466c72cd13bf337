"""A real HTTP file server for tests and bench/remote_streaming.py: Range requests, a request
log, and injected faults and slowness (a storage server as the loader meets it in the wild).

    with ShardServer(root, fail_every=4, reset_once=True) as srv:   # srv.url = http://127.0.0.1:PORT
        ...
    srv.log   # [(method, path, status, range header), ...]

Python's own ThreadingHTTPServer does the protocol; only GET/HEAD with byte ranges and the
fault switches are written here, because http.server.SimpleHTTPRequestHandler has no Range.
"""
from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple


class Request(NamedTuple):
    method: str
    path: str
    status: int
    range: str


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet; the log is srv.log
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        o = self.server.owner
        path = self.path.split("?", 1)[0].lstrip("/")
        status = o._decide(self.command, path)
        file = (o.root / path).resolve()
        if status is None and (not file.is_file() or o.root not in file.parents):
            status = 404
        if status is not None:
            o._record(self.command, path, status, "")
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range", "")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        if m:
            start, status = int(m.group(1)), 206
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        o._record(self.command, path, status, rng)
        time.sleep(o.latency_s)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            self._send_body(file, start, end - start + 1, o._take_reset(path))

    def _send_body(self, file: Path, start: int, n: int, reset: bool) -> None:
        o = self.server.owner
        with open(file, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < n:
                block = f.read(min(64 << 10, n - sent))
                if reset and sent + len(block) >= n // 2:
                    self.wfile.write(block[: max(1, n // 2 - sent)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # a connection reset mid-body
                    return
                self.wfile.write(block)
                sent += len(block)
                if o.bandwidth:
                    time.sleep(len(block) / o.bandwidth)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ShardServer"

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up early (webdataset's curl when a reader stops) is normal."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class ShardServer:
    """Serve `root` on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(self, root: str | os.PathLike, *, fail_every: int = 0, reset_once: bool = False,
                 latency_s: float = 0.0, bandwidth: float = 0.0, port: int = 0) -> None:
        """fail_every=N: every N-th request answers 503; reset_once: the first shard body is cut
        mid-way by closing the connection; latency_s per request; bandwidth in bytes/s (0 = no cap);
        port: 0 = any free one, or the port of a server stopped earlier (the source coming back)."""
        self.root = Path(root).resolve()
        self.fail_every, self.reset_pending = fail_every, reset_once
        self.latency_s, self.bandwidth = latency_s, bandwidth
        self.log: list[Request] = []
        self._n = 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _decide(self, method: str, path: str) -> int | None:
        with self._lock:
            self._n += 1
            if self.fail_every and self._n % self.fail_every == 0:
                return 503
        return None

    def _take_reset(self, path: str) -> bool:
        with self._lock:
            if self.reset_pending and path.endswith(".tar"):
                self.reset_pending = False
                return True
        return False

    def _record(self, method: str, path: str, status: int, rng: str) -> None:
        with self._lock:
            self.log.append(Request(method, path, status, rng))

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def fetched(self, suffix: str = ".tar") -> list[str]:
        """Paths of successful GETs of `suffix` files, in order (a path twice = fetched twice)."""
        with self._lock:
            return [r.path for r in self.log if r.method == "GET" and r.status in (200, 206)
                    and r.path.endswith(suffix)]
