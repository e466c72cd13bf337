"""Chat corpora: micro-batches of whole conversations, one row at a time, never split.

The documents of each epoch come in exactly the order the text stream would use (order.py:
seeded shard order, seeded blocks). With `data.pack=true` consecutive conversations fill a
row greedily while they fit in `seq_len` tokens; the rest of the row is padding. With
`data.pack=false` each row holds one conversation. Either way rows never straddle an epoch,
and the rows of every epoch are a pure function of (shards, seed, seq_len, pack), so the
global row sequence is the same on every rank and world size. Micro-batch number g is rows
[g*B, (g+1)*B) of it and the loader's resume state is one row index, as the token position
is for text (loader.py).

Padding (right, with the tokenizer's pad id, its EOS where it has none) has label -100 and
position ids of its own segment, so it is never attended to by, nor trained from, real tokens.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.read.batches import IGNORE, ShardReader, fill, restart_positions
from data_pipeline.read.order import GlobalOrder, Piece
from data_pipeline.read.shared import for_pickle, numpy_of, shared


class RowOrder:
    """Maps global row numbers to the (shard, doc) conversations each row holds."""

    def __init__(self, order: GlobalOrder, seq_len: int, pack: bool) -> None:
        self.order, self.seq_len, self.pack = order, int(seq_len), bool(pack)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cum_rows = [0]   # rows before epoch e, for the epochs counted so far

    def __getstate__(self) -> dict[str, Any]:
        """The cached epochs' rows (per document) go to workers as shared memory (shared.py)."""
        self._epochs = OrderedDict((e, tuple(shared(a) for a in rows)) for e, rows in self._epochs.items())
        return {**self.__dict__, "_epochs": [(e, tuple(for_pickle(a) for a in rows))
                                             for e, rows in self._epochs.items()]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._epochs = OrderedDict((e, tuple(numpy_of(a) for a in rows)) for e, rows in state["_epochs"])

    def _rows(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards, docs, starts) of epoch e: row r holds docs[starts[r]:starts[r + 1]]."""
        if e not in self._epochs:
            shards, docs = self.order.epoch_docs(e)
            if self.pack:
                cum = np.concatenate([[0], np.cumsum(self.order.table.lengths[docs])])
                starts, i = [0], 0
                while i < len(docs):  # greedy first fit in stream order, one bisection per row
                    i = max(int(np.searchsorted(cum, cum[i] + self.seq_len, side="right")) - 1, i + 1)
                    starts.append(i)
                row_starts = np.asarray(starts, dtype=np.int64)
            else:
                row_starts = np.arange(len(docs) + 1, dtype=np.int64)
            self._epochs[e] = (shards, docs, row_starts)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def rows_in(self, e: int) -> int:
        if not self.pack:
            return self.order.num_docs
        while len(self._cum_rows) <= e + 1:
            n = len(self._cum_rows) - 1
            self._cum_rows.append(self._cum_rows[-1] + len(self._rows(n)[2]) - 1)
        return self._cum_rows[e + 1] - self._cum_rows[e]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, row within it) of global row g."""
        if not self.pack:
            return divmod(int(g), self.order.num_docs)
        while self._cum_rows[-1] <= g:
            self.rows_in(len(self._cum_rows) - 1)
        e = bisect.bisect_right(self._cum_rows, g) - 1
        return e, int(g) - self._cum_rows[e]

    def rows(self, g: int, count: int) -> list[list[tuple[int, int]]]:
        """The conversations (shard, doc) of rows g .. g + count - 1."""
        e, r = self.locate(g)
        out = []
        for _ in range(count):
            shards, docs, starts = self._rows(e)
            a, b = int(starts[r]), int(starts[r + 1])
            out.append(list(zip(shards[a:b].tolist(), docs[a:b].tolist())))
            r += 1
            if r == len(starts) - 1:
                e, r = e + 1, 0
        return out

    def epoch_of(self, g: int) -> float:
        e, r = self.locate(g)
        return e + r / self.rows_in(e)

    def tokens_before(self, g: int) -> int:
        """Real (non-pad) tokens in rows 0 .. g - 1 (every epoch holds every token once)."""
        e, r = self.locate(g)
        _, docs, starts = self._rows(e)
        within = int(self.order.table.lengths[docs[:int(starts[r])]].sum())
        return e * self.order.epoch_tokens + within


class RowSpan(NamedTuple):
    """One micro-batch of rows as a worker hands it over (compact, like batches.Span)."""

    tokens: np.ndarray         # B*T token ids, padding included
    targets: np.ndarray        # B*T uint8: 1 = this token is a target
    doc_starts: list[int]      # flat offsets where conversations start
    ends: list[int]            # flat offset where each row's conversations end (padding follows)
    bad: list[tuple[int, int]]
    notes: dict[str, Any]


class RowSpans:
    """What a loader worker needs for chat corpora: row number -> RowSpan -> batch.
    `unit` is how far the row sequence advances per micro-batch (B rows)."""

    def __init__(self, order: RowOrder, reader: ShardReader, rows: int, seq_len: int,
                 pad_id: int, on_error: str) -> None:
        self.order, self.reader, self.rows, self.seq_len = order, reader, rows, seq_len
        self.pad_id, self.on_error = int(pad_id), on_error
        self.unit = rows

    def read(self, pos: int) -> RowSpan:
        t = self.seq_len
        tokens = np.full(self.rows * t, self.pad_id, dtype=self.reader.span_dtype)
        targets = np.zeros(self.rows * t, dtype=np.uint8)
        lengths = self.reader.table.lengths
        pieces, starts, ends = [], [], []
        for b, row in enumerate(self.order.rows(pos, self.rows)):
            out = b * t
            for shard, doc in row:
                n = min(int(lengths[doc]), (b + 1) * t - out)  # loader checked lengths <= T
                pieces.append(Piece(shard, doc, 0, n, out))
                starts.append(out)
                out += n
            ends.append(out)
        bad, notes = fill(self.reader, tokens, pieces, self.on_error, targets)
        return RowSpan(tokens, targets, starts, ends, bad, notes)

    def shards(self, pos: int) -> list[int]:
        """The shards read(pos) reads, in order of first use (for prefetch.py)."""
        return list(dict.fromkeys(s for row in self.order.rows(pos, self.rows) for s, _ in row))

    @property
    def epoch_units(self) -> int:
        return self.order.rows_in(0)

    def finish(self, span: RowSpan) -> dict[str, torch.Tensor]:
        """input_ids / labels (shifted, see batches.py) / position_ids of one RowSpan."""
        t, n = self.seq_len, self.rows * self.seq_len
        ids = span.tokens.astype(np.int64)
        targets = span.targets.astype(bool)
        targets[span.doc_starts] = False  # nothing of its own conversation precedes it
        labels = np.full(n, IGNORE, dtype=np.int64)
        labels[:-1] = np.where(targets[1:], ids[1:], IGNORE)
        labels[t - 1::t] = IGNORE         # a row's last position predicts nothing of the row
        for out, take in span.bad:
            labels[max(out - 1, 0):out + take] = IGNORE
        pads = [e for b, e in enumerate(span.ends) if e < (b + 1) * t]
        positions = restart_positions(n, t, list(span.doc_starts) + pads)
        shape = (self.rows, t)
        return {"input_ids": torch.from_numpy(ids.reshape(shape)),
                "labels": torch.from_numpy(labels.reshape(shape)),
                "position_ids": torch.from_numpy(positions.reshape(shape))}

    def epoch_of(self, pos: int) -> float:
        return self.order.epoch_of(pos)

    def close(self) -> None:
        self.reader.close()
