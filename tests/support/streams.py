"""Streams over shard indexes alone (no shard is opened until a span is read): what a rank sends
its DataLoader workers, for the index-sharing tests (data_pipeline/read/shared.py)."""
from __future__ import annotations

import numpy as np

from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import make_spans
from data_pipeline.read.order import GlobalOrder
from data_pipeline.read.stream import RankStream
from data_pipeline.read.table import ShardTable, assemble

SHARDS = 4


def index_table(docs: int, chat: bool) -> ShardTable:
    """A table of `docs` documents of 1-4 tokens over SHARDS shards, built from shard indexes
    alone (the stream never opens a shard until it reads)."""
    rng = np.random.default_rng(0)
    idxs = []
    for n in np.full(SHARDS, docs // SHARDS):
        tokens = np.concatenate([[0], np.cumsum(rng.integers(1, 5, n))])
        cols = [np.arange(n + 1) * 1024, tokens] + ([np.arange(n + 1) * 1024 + 512] if chat else [])
        idxs.append(np.stack(cols, axis=1).astype(np.uint64))
    names = [f"shard-{i:06d}.tar" for i in range(SHARDS)]
    return assemble(names, names, idxs, [2] * SHARDS, 1000, 0, None, [], 0)


def index_stream(docs: int, chat: bool = False) -> RankStream:
    table = index_table(docs, chat)
    order = GlobalOrder(table, seed=0, shuffle_block=64)
    spans = make_spans(table, order, WebDatasetConfig(urls="unused", num_workers=1), 2, 8)
    if chat:
        spans.order.rows_in(0)   # the rank counts epoch 0's rows (epoch_units, metrics): cached
    return RankStream(spans, base=0, first_round=0, rank=0, world_size=1)
