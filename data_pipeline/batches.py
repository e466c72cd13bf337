"""Turn a span of the global stream into one packed micro-batch.

A micro-batch of B rows x T tokens is the span [pos, pos + B*T + 1) of the stream: row b's
`input_ids` are tokens pos+bT .. pos+bT+T-1 and its `labels` the tokens one further, so
documents are packed back to back and split across rows where they must. `position_ids`
restart at 0 at every document start and at every row start. The label that would predict
the first token of the next document from the previous document's EOS is -100 (the same
choice as transformers' DataCollatorWithFlattening), so the model learns to emit EOS but is
never asked to guess an unrelated document from it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.order import GlobalOrder, Piece
from data_pipeline.shard_format import ShardFormatError
from data_pipeline.shard_table import ShardTable

IGNORE = -100


class ShardReader:
    """Random reads of document tokens by (shard, byte offset): pread on cached descriptors.

    pread, not mmap: a shard truncated under a running job gives a short read we can report
    instead of a SIGBUS that kills the worker.
    """

    def __init__(self, table: ShardTable, max_open: int = 64) -> None:
        self.table = table
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.locate = lambda shard: self.table.paths[shard]   # remote: the Prefetcher's path()
        self._dtypes = [np.dtype("<u2") if s == 2 else np.dtype("<u4") for s in table.itemsize]
        self.span_dtype = np.dtype("<u4") if 4 in set(table.itemsize.tolist()) else np.dtype("<u2")

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_fds": OrderedDict()}
        state.pop("locate")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.locate = lambda shard: self.table.paths[shard]

    def forget(self, shard: int) -> None:
        """Close shard's descriptor (before the cache may evict the file)."""
        fd = self._fds.pop(shard, None)
        if fd is not None:
            os.close(fd)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.locate(shard), os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def read_into(self, dst: np.ndarray, piece: Piece) -> None:
        """Fill dst (piece.take tokens) with the piece's tokens; straight into dst when the
        shard's dtype is dst's (one syscall, no intermediate bytes)."""
        dt = self._dtypes[piece.shard]
        off = int(self.table.offsets[piece.doc]) + piece.within * dt.itemsize
        want = piece.take * dt.itemsize
        if dt == dst.dtype:
            got = os.preadv(self._fd(piece.shard), [dst], off)
        else:
            data = os.pread(self._fd(piece.shard), want, off)
            got = len(data)
            if got == want:
                dst[:] = np.frombuffer(data, dtype=dt)
        if got != want:
            raise ShardFormatError(f"shard {self.table.names[piece.shard]} is truncated: short read "
                                   f"of document data at byte {off} ({got} of {want} bytes)")

    def close(self, _close=os.close) -> None:  # bound early: also runs at interpreter exit
        for fd in self._fds.values():
            _close(fd)
        self._fds.clear()


class Span(NamedTuple):
    """What a worker hands over for one micro-batch: the raw tokens of the stream span
    (uint16/uint32, B*T+1 of them), where documents start in it, and masked ranges.

    Compact on purpose: pickling 2-4 bytes a token through the worker queue costs a fraction
    of moving three int64 tensors through torch's shared-memory files (see BENCHMARKS.md).
    """

    tokens: np.ndarray
    doc_starts: list[int]
    bad: list[tuple[int, int]]
    notes: dict[str, Any]


def read_span(order: GlobalOrder, reader: ShardReader, pos: int, n: int, on_error: str) -> Span:
    """Tokens [pos, pos + n) of the stream; bad pieces are zeroed (skip) or raise."""
    buf = np.empty(n, dtype=reader.span_dtype)
    pieces = list(order.pieces(pos, n))
    bad: list[tuple[int, int]] = []
    notes: dict[str, Any] = {"masked_tokens": 0, "bad": []}

    def failed(piece: Piece, e: Exception) -> None:
        if on_error == "raise":
            raise ShardFormatError(f"{e} (set data.on_error=skip to mask bad data)") from e
        buf[piece.out:piece.out + piece.take] = 0
        bad.append((piece.out, piece.take))
        notes["masked_tokens"] += piece.take
        notes["bad"].append(str(e))

    for piece in pieces:
        try:
            reader.read_into(buf[piece.out:piece.out + piece.take], piece)
        except (ShardFormatError, OSError) as e:
            failed(piece, e)
    vocab = reader.table.vocab_size
    if (1 << 8 * buf.itemsize) > vocab and int(buf.max()) >= vocab:  # one pass; find culprits
        for piece in pieces:
            top = int(buf[piece.out:piece.out + piece.take].max())
            if top >= vocab:
                local = piece.doc - int(reader.table.doc_base[piece.shard])
                failed(piece, ShardFormatError(
                    f"shard {reader.table.names[piece.shard]}: document {local} has token id "
                    f"{top} >= vocab_size {vocab} (bad array)"))
    return Span(buf, [p.out for p in pieces if p.within == 0], bad, notes)


_RANGE = np.arange(1 << 16, dtype=np.int64)


def _ranges(n: int) -> np.ndarray:
    global _RANGE
    if n > len(_RANGE):
        _RANGE = np.arange(max(n, 2 * len(_RANGE)), dtype=np.int64)
    return _RANGE


def finish_batch(span: Span, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The int64 [rows, seq_len] input_ids / labels / position_ids of a span (see top)."""
    n = rows * seq_len + 1
    buf = span.tokens.astype(np.int64)
    labels = buf[1:].copy()
    labels[[s - 1 for s in span.doc_starts if s > 0]] = IGNORE
    for out, take in span.bad:
        labels[max(out - 1, 0):out + take] = IGNORE
    positions = np.empty(n - 1, dtype=np.int64)
    bounds = sorted(set(range(0, n - 1, seq_len)).union(s for s in span.doc_starts if s < n - 1))
    ar = _ranges(n)
    for a, b in zip(bounds, bounds[1:] + [n - 1]):
        positions[a:b] = ar[:b - a]
    return {"input_ids": torch.from_numpy(buf[:-1].reshape(rows, seq_len)),
            "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
            "position_ids": torch.from_numpy(positions.reshape(rows, seq_len))}
