"""Preference corpora (`prepare mode=preference`): micro-batches of whole pairs for objective=dpo.

A pair is one document whose tokens are prompt + chosen + rejected and whose mask marks them
0 / 1 / 2 (prepare/preference.py). Micro-batch number g holds pairs [g*B, (g+1)*B) of the global
pair sequence, which is the chat row sequence with one pair per row (rows.py, pack=false): the
same seeded order, workers, prefetch and one-integer resume state as every other corpus.

The batch holds 2B rows of `seq_len` tokens: rows [0, B) are prompt + chosen, rows [B, 2B)
prompt + rejected, pair i in rows i and B + i; right padding with the pad id. `labels` are
pre-shifted as in batches.py and -100 everywhere but the completion's tokens, so the summed
log-prob of a row is its completion's. `pair_index` [B] is each pair's global document id in
the split's table (where a precomputed reference log-prob is found).
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from data_pipeline.read.batches import IGNORE, ShardReader, fill
from data_pipeline.read.order import GlobalOrder, Piece
from data_pipeline.read.rows import RowOrder
from data_pipeline.read.shard_table import ShardTable

CHOSEN, REJECTED = 1, 2


class PairSpan(NamedTuple):
    """What a worker hands over for one micro-batch of pairs (compact, like batches.Span)."""

    tokens: np.ndarray     # the B pairs' tokens back to back
    marks: np.ndarray      # uint8 per token: 0 prompt, 1 chosen, 2 rejected
    lengths: list[int]     # tokens per pair
    docs: list[int]        # global doc id per pair
    bad: list[tuple[int, int]]
    notes: dict[str, Any]


def too_long(length: int, seq_len: int, max_len: Any) -> ValueError:
    return ValueError(f"a preference pair has a sequence of {length} tokens > trainer.seq_len={seq_len} "
                      f"(prepared with preference.max_len={max_len}; a pair is never cut at read time): "
                      f"raise trainer.seq_len, or prepare again with preference.max_len<={seq_len}")


class PairSpans:
    """What a loader worker needs for preference corpora: pair number -> PairSpan -> batch.
    `unit` is how far the pair sequence advances per micro-batch (B pairs)."""

    unit_name = "pairs"

    def __init__(self, order: GlobalOrder, reader: ShardReader, pairs: int, seq_len: int,
                 pad_id: int, on_error: str) -> None:
        self.order = RowOrder(order, seq_len, pack=False)
        self.reader, self.pairs, self.seq_len = reader, pairs, seq_len
        self.pad_id, self.on_error = int(pad_id), on_error
        self.unit = pairs
        self.max_len = (reader.table.chat or {}).get("max_len")

    def read_docs(self, docs: list[tuple[int, int]]) -> PairSpan:
        """The pairs (shard, global doc id), read as one span."""
        lengths = [int(self.reader.table.lengths[doc]) for _, doc in docs]
        tokens = np.zeros(sum(lengths), dtype=self.reader.span_dtype)
        marks = np.zeros(sum(lengths), dtype=np.uint8)
        pieces, out = [], 0
        for (shard, doc), n in zip(docs, lengths):
            pieces.append(Piece(shard, doc, 0, n, out))
            out += n
        bad, notes = fill(self.reader, tokens, pieces, self.on_error, marks)
        return PairSpan(tokens, marks, lengths, [doc for _, doc in docs], bad, notes)

    def read(self, pos: int) -> PairSpan:
        return self.read_docs([row[0] for row in self.order.rows(pos, self.pairs)])

    def shards(self, pos: int) -> list[int]:
        """The shards read(pos) reads, in order of first use (for prefetch.py)."""
        return list(dict.fromkeys(row[0][0] for row in self.order.rows(pos, self.pairs)))

    @property
    def epoch_units(self) -> int:
        return self.order.rows_in(0)

    def finish(self, span: PairSpan) -> dict[str, torch.Tensor]:
        """input_ids / labels / position_ids [2B, T] and pair_index [B] (see the module docstring)."""
        b, t = len(span.lengths), self.seq_len
        ids = np.full((2 * b, t), self.pad_id, dtype=np.int64)
        labels = np.full((2 * b, t), IGNORE, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(span.lengths)]).astype(np.int64)
        for i in range(b):
            tok = span.tokens[starts[i]:starts[i + 1]].astype(np.int64)
            mark = span.marks[starts[i]:starts[i + 1]]
            prompt = tok[mark == 0]
            for row, which in ((i, CHOSEN), (b + i, REJECTED)):
                comp = tok[mark == which]
                seq = np.concatenate([prompt, comp])
                if len(seq) > t:
                    raise too_long(len(seq), t, self.max_len)
                ids[row, :len(seq)] = seq
                lo = max(len(prompt) - 1, 0)
                labels[row, lo:len(seq) - 1] = seq[lo + 1:]
        for out, take in span.bad:  # a bad pair: nothing of it is trained on
            i = int(np.searchsorted(starts, out, side="right")) - 1
            labels[[i, b + i]] = IGNORE
        positions = np.broadcast_to(np.arange(t, dtype=np.int64), (2 * b, t)).copy()
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions),
                "pair_index": torch.tensor(span.docs, dtype=torch.int64)}

    def epoch_of(self, pos: int) -> float:
        return self.order.epoch_of(pos)

    def close(self) -> None:
        self.reader.close()


def pair_spans(table: ShardTable, order: GlobalOrder, pairs: int, seq_len: int, on_error: str) -> PairSpans:
    pad = (table.chat or {}).get("pad_token_id")
    pad = pad if pad is not None else (table.eos_token_id if table.eos_token_id is not None else 0)
    return PairSpans(order, ShardReader(table), pairs, seq_len, pad, on_error)


def pairs_in_table_order(table: ShardTable, pairs: int, seq_len: int, on_error: str = "raise",
                         first: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Every pair of the table once, in table order, B at a time (the last batch may be short),
    from pair `first` on: for a pass over the data such as precomputing reference log-probs."""
    order = GlobalOrder(table, 0, 0, shuffle=False)
    spans = pair_spans(table, order, pairs, seq_len, on_error)
    doc_shard = np.repeat(np.arange(len(table.n_docs)), table.n_docs)
    try:
        for lo in range(first, int(table.doc_base[-1]), pairs):
            docs = range(lo, min(lo + pairs, int(table.doc_base[-1])))
            yield spans.finish(spans.read_docs([(int(doc_shard[g]), g) for g in docs]))
    finally:
        spans.close()
