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
from typing import Any

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
        self._dtypes = [np.dtype("<u2") if s == 2 else np.dtype("<u4") for s in table.itemsize]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": OrderedDict()}

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.table.paths[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def read(self, piece: Piece) -> np.ndarray:
        """The piece's tokens (little-endian uint16/uint32 view of fresh bytes)."""
        dt = self._dtypes[piece.shard]
        off = int(self.table.offsets[piece.doc]) + piece.within * dt.itemsize
        want = piece.take * dt.itemsize
        data = os.pread(self._fd(piece.shard), want, off)
        if len(data) != want:
            raise ShardFormatError(f"shard {self.table.names[piece.shard]} is truncated: short read "
                                   f"of document data at byte {off} ({len(data)} of {want} bytes)")
        return np.frombuffer(data, dtype=dt)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def build_batch(order: GlobalOrder, reader: ShardReader, pos: int, rows: int, seq_len: int,
                on_error: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The micro-batch at stream position `pos`, plus notes on masked data for metrics."""
    n = rows * seq_len + 1
    buf = np.empty(n, dtype=np.int64)
    starts = np.zeros(n, dtype=bool)
    bad = None
    notes: dict[str, Any] = {"masked_tokens": 0, "bad": []}
    vocab = reader.table.vocab_size
    for piece in order.pieces(pos, n):
        dst = buf[piece.out:piece.out + piece.take]
        if piece.within == 0:
            starts[piece.out] = True
        try:
            dst[:] = reader.read(piece)
            if dst.max() >= vocab:
                raise ShardFormatError(
                    f"shard {reader.table.names[piece.shard]}: document {piece.doc - int(reader.table.doc_base[piece.shard])} "
                    f"has token id {int(dst.max())} >= vocab_size {vocab} (bad array)")
        except (ShardFormatError, OSError) as e:
            if on_error == "raise":
                raise ShardFormatError(f"{e} (set data.on_error=skip to mask bad data)") from e
            bad = np.zeros(n, dtype=bool) if bad is None else bad
            bad[piece.out:piece.out + piece.take] = True
            dst[:] = 0
            notes["masked_tokens"] += piece.take
            notes["bad"].append(str(e))
    labels = buf[1:].copy()
    labels[starts[1:]] = IGNORE
    if bad is not None:
        labels[bad[1:] | bad[:-1]] = IGNORE
    row_start = starts[:-1].copy()
    row_start[::seq_len] = True
    idx = np.arange(n - 1)
    positions = idx - np.maximum.accumulate(np.where(row_start, idx, 0))
    batch = {"input_ids": torch.from_numpy(buf[:-1].reshape(rows, seq_len)),
             "labels": torch.from_numpy(labels.reshape(rows, seq_len)),
             "position_ids": torch.from_numpy(positions.reshape(rows, seq_len))}
    return batch, notes
