"""Turn a span of the global stream into one packed micro-batch.

The batch contract (what the loop, the strategies and `train.model.lm_loss` consume): a dict
of int64 [rows, seq_len] tensors

- `input_ids`;
- `labels`, ALREADY SHIFTED: labels[b, t] is the target for the logits at input_ids[b, t],
  i.e. the token at t + 1, or -100 (ignored). The loss is a plain
  `cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`, with no shift
  inside (unlike a Hugging Face model called with `labels=`, which shifts itself);
- `position_ids`: restart at 0 at every document / conversation start (transformers then
  builds a block-diagonal causal mask, so packed documents do not attend to each other).

Text corpora (this module): a micro-batch of B rows x T tokens is the span [pos, pos + B*T + 1)
of the stream: row b's `input_ids` are tokens pos+bT .. pos+bT+T-1 and its `labels` the
tokens one further, so documents are packed back to back and split across rows where they
must. `position_ids` restart at 0 at every document start and at every row start. The label
that would predict the first token of the next document from the previous document's EOS is
-100 (the same choice as transformers' DataCollatorWithFlattening), so the model learns to
emit EOS but is never asked to guess an unrelated document from it.

Chat corpora (rows.py): whole conversations per row, never split; labels[t] is the token at
t + 1 only where that token is a target (its mask byte is 1), else -100.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch

from data_pipeline.read.order import GlobalOrder, Piece
from data_pipeline.read.shard_table import ShardTable
from data_pipeline.shards.format import ShardFormatError

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

    def read_into(self, dst: np.ndarray, piece: Piece, mask: bool = False) -> None:
        """Fill dst (piece.take tokens) with the piece's tokens, or with its chat target mask
        (uint8); straight into dst when the shard's dtype is dst's (one syscall)."""
        if mask:
            dt, base = np.dtype(np.uint8), self.table.mask_offsets
        else:
            dt, base = self._dtypes[piece.shard], self.table.offsets
        off = int(base[piece.doc]) + piece.within * dt.itemsize
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
                                   f"of document {'mask' if mask else 'data'} at byte {off} "
                                   f"({got} of {want} bytes)")

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


def fill(reader: ShardReader, buf: np.ndarray, pieces: list[Piece], on_error: str,
         masks: np.ndarray | None = None) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Read the pieces' tokens (and chat target masks) into buf/masks at piece.out; a bad piece
    is zeroed and reported as a (start, length) range (on_error=skip) or raises."""
    bad: list[tuple[int, int]] = []
    notes: dict[str, Any] = {"masked_tokens": 0, "bad": []}

    def failed(piece: Piece, e: Exception) -> None:
        if on_error == "raise":
            raise ShardFormatError(f"{e} (set data.on_error=skip to mask bad data)") from e
        buf[piece.out:piece.out + piece.take] = 0
        if masks is not None:
            masks[piece.out:piece.out + piece.take] = 0
        bad.append((piece.out, piece.take))
        notes["masked_tokens"] += piece.take
        notes["bad"].append(str(e))

    for piece in pieces:
        try:
            reader.read_into(buf[piece.out:piece.out + piece.take], piece)
            if masks is not None:
                reader.read_into(masks[piece.out:piece.out + piece.take], piece, mask=True)
        except (ShardFormatError, OSError) as e:
            failed(piece, e)
    vocab = reader.table.vocab_size
    if (1 << 8 * buf.itemsize) > vocab and len(buf) and int(buf.max()) >= vocab:  # find culprits
        for piece in pieces:
            top = int(buf[piece.out:piece.out + piece.take].max())
            if top >= vocab:
                local = piece.doc - int(reader.table.doc_base[piece.shard])
                failed(piece, ShardFormatError(
                    f"shard {reader.table.names[piece.shard]}: document {local} has token id "
                    f"{top} >= vocab_size {vocab} (bad array)"))
    return bad, notes


def read_span(order: GlobalOrder, reader: ShardReader, pos: int, n: int, on_error: str) -> Span:
    """Tokens [pos, pos + n) of the stream; bad pieces are zeroed (skip) or raise."""
    buf = np.empty(n, dtype=reader.span_dtype)
    pieces = list(order.pieces(pos, n))
    bad, notes = fill(reader, buf, pieces, on_error)
    return Span(buf, [p.out for p in pieces if p.within == 0], bad, notes)


_RANGE = np.arange(1 << 16, dtype=np.int64)


def _ranges(n: int) -> np.ndarray:
    global _RANGE
    if n > len(_RANGE):
        _RANGE = np.arange(max(n, 2 * len(_RANGE)), dtype=np.int64)
    return _RANGE


def restart_positions(total: int, seq_len: int, starts: Iterable[int]) -> np.ndarray:
    """0, 1, 2, ... restarting at every row start (multiples of seq_len) and at `starts`."""
    positions = np.empty(total, dtype=np.int64)
    bounds = sorted(set(range(0, total, seq_len)).union(starts))
    ar = _ranges(total + 1)
    for a, b in zip(bounds, bounds[1:] + [total]):
        positions[a:b] = ar[:b - a]
    return positions


def finish_batch(span: Span, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The int64 [rows, seq_len] input_ids / labels / position_ids of a span (see top)."""
    n = rows * seq_len + 1
    buf = span.tokens.astype(np.int64)
    labels = buf[1:].copy()
    labels[[s - 1 for s in span.doc_starts if s > 0]] = IGNORE
    for out, take in span.bad:
        labels[max(out - 1, 0):out + take] = IGNORE
    positions = restart_positions(n - 1, seq_len, (s for s in span.doc_starts if s < n - 1))
    return {"input_ids": torch.from_numpy(buf[:-1].reshape(rows, seq_len)),
            "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
            "position_ids": torch.from_numpy(positions.reshape(rows, seq_len))}


class TokenSpans:
    """What a loader worker needs for text corpora: stream position -> Span -> batch.
    `unit` is how far the stream advances per micro-batch (B*T tokens)."""

    def __init__(self, order: GlobalOrder, reader: ShardReader, rows: int, seq_len: int,
                 on_error: str) -> None:
        self.order, self.reader, self.rows, self.seq_len = order, reader, rows, seq_len
        self.on_error = on_error
        self.unit = rows * seq_len

    def read(self, pos: int) -> Span:
        return read_span(self.order, self.reader, pos, self.unit + 1, self.on_error)

    def shards(self, pos: int) -> list[int]:
        """The shards read(pos) reads, in order of first use (for prefetch.py)."""
        return list(dict.fromkeys(p.shard for p in self.order.pieces(pos, self.unit + 1)))

    @property
    def epoch_units(self) -> int:
        return self.order.epoch_tokens

    def finish(self, span: Span) -> dict[str, torch.Tensor]:
        return finish_batch(span, self.rows, self.seq_len)

    def epoch_of(self, pos: int) -> float:
        return self.order.epoch_of(pos)

    def close(self) -> None:
        self.reader.close()
