"""The global, seeded, endless token stream every rank agrees on (no communication).

Epoch `e` lists the shards in a seeded order (a fresh permutation per epoch) and their
documents in shard order; that list is cut into blocks of `block_docs` documents and each
block is permuted with its own seed (a positional, seekable form of a shuffle buffer of that
size). Concatenating the documents' tokens, epoch after epoch, gives one endless stream.

Batches are contiguous spans of that stream, dealt round-robin to ranks (see loader.py), so
the consumed part of the stream is always a prefix: resume is one integer (the token
position), the same for every rank and valid for any world size (like MosaicML Streaming's
world-size-independent sample order). Plans need only the shard indexes, never the data.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from data_pipeline.read.shard_table import ShardTable


class Piece(NamedTuple):
    """`take` tokens of document `doc` (global id, in `shard`) from token `within` on,
    landing at offset `out` of the requested span."""

    shard: int
    doc: int
    within: int
    take: int
    out: int


class _Block(NamedTuple):
    shards: list[int]
    docs: list[int]
    starts: list[int]   # token offset of each doc inside the block (len m + 1)
    tok0: int           # token offset of the block inside its epoch


class GlobalOrder:
    """Maps stream token positions to document pieces; pure function of (table, seed)."""

    def __init__(self, table: ShardTable, seed: int, shuffle_block: int, shuffle: bool = True) -> None:
        """shuffle: permute shards per epoch; shuffle_block: documents per shuffled block
        (0 = keep shard order; blocks of 1024 then only speed up lookups)."""
        self.table, self.seed = table, int(seed)
        self.shuffle, self.shuffle_docs = shuffle, shuffle and shuffle_block > 0
        self.num_docs = int(table.doc_base[-1])
        self.epoch_tokens = table.total_tokens
        if self.epoch_tokens <= 0:
            raise ValueError("the shards hold no tokens")
        self.block = int(shuffle_block) if shuffle_block > 0 else 1024
        self.num_blocks = -(-self.num_docs // self.block)
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], _Block] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if e not in self._epochs:
            t = self.table
            perm = np.random.default_rng([self.seed, e, 0]).permutation(len(t.n_docs)) \
                if self.shuffle else np.arange(len(t.n_docs))
            doc_cum = np.concatenate([[0], np.cumsum(t.n_docs[perm])])
            tok_cum = np.concatenate([[0], np.cumsum(t.n_tokens[perm])])
            self._epochs[e] = (perm, doc_cum, tok_cum)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _tok_at(self, e: int, d: int) -> int:
        """Token offset, within epoch e, of the d-th document in shard order."""
        if d >= self.num_docs:
            return self.epoch_tokens
        perm, doc_cum, tok_cum = self._epoch(e)
        i = int(np.searchsorted(doc_cum, d, side="right")) - 1
        s = int(perm[i])
        local = d - int(doc_cum[i])
        base = int(self.table.doc_base[s])
        return int(tok_cum[i]) + int(self.table.cum_tokens[base + local] - self.table.cum_tokens[base])

    def _block_docs(self, e: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards, global doc ids) of block k of epoch e, in stream order."""
        perm, doc_cum, _ = self._epoch(e)
        d = np.arange(k * self.block, min((k + 1) * self.block, self.num_docs))
        i = np.searchsorted(doc_cum, d, side="right") - 1
        shards = perm[i]
        docs = self.table.doc_base[shards] + (d - doc_cum[i])
        if self.shuffle_docs:
            p = np.random.default_rng([self.seed, e, k + 1]).permutation(len(d))
            shards, docs = shards[p], docs[p]
        return shards, docs

    def epoch_docs(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards, global doc ids) of every document of epoch e, in stream order (the
        sequence the token stream concatenates; rows.py packs it into rows)."""
        parts = [self._block_docs(e, k) for k in range(self.num_blocks)]
        return (np.concatenate([p[0] for p in parts]).astype(np.int64),
                np.concatenate([p[1] for p in parts]).astype(np.int64))

    def _block(self, e: int, k: int) -> _Block:
        key = (e, k)
        if key not in self._blocks:
            shards, docs = self._block_docs(e, k)
            starts = np.concatenate([[0], np.cumsum(self.table.lengths[docs])])
            self._blocks[key] = _Block(shards.tolist(), docs.tolist(), starts.tolist(),
                                       self._tok_at(e, k * self.block))
            if len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return self._blocks[key]

    def _locate(self, e: int, p: int) -> int:
        return bisect.bisect_right(range(self.num_blocks), p,
                                   key=lambda k: self._tok_at(e, k * self.block)) - 1

    def epoch_of(self, pos: int) -> float:
        """Fractional epochs covered by stream position `pos`."""
        return pos / self.epoch_tokens

    def pieces(self, pos: int, n: int) -> Iterator[Piece]:
        """The document pieces covering stream tokens [pos, pos + n)."""
        out = 0
        while out < n:
            e, p = divmod(pos + out, self.epoch_tokens)
            k = self._locate(e, p)
            while out < n and k < self.num_blocks:
                blk = self._block(e, k)
                rel = p - blk.tok0
                j = bisect.bisect_right(blk.starts, rel) - 1
                while out < n and j < len(blk.docs):
                    within = rel - blk.starts[j]
                    take = min(blk.starts[j + 1] - blk.starts[j] - within, n - out)
                    yield Piece(blk.shards[j], blk.docs[j], within, take, out)
                    out += take
                    rel += take
                    p += take
                    j += 1
                k += 1
