"""Plan-aware background fetch of remote shards, `data.prefetch_shards` deep.

The global order (order.py; rows.py for chat) says exactly which documents every round of
every rank reads (`spans.shards(pos)`), so a reader knows its next shards without looking at
data. Before round k a reader calls
`advance(k)`: the window becomes the shards of round k plus the next distinct shards of its
later rounds, up to `prefetch_shards` in all. Window shards are pinned in the node cache
(cache.py) and downloaded by background threads in order of need; shards that leave the
window are released (their descriptors closed first) and become evictable.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.shards.format import ShardFormatError
from data_pipeline.storage.backends import DataSourceLost, FetchError, fetch_into, parse_size
from data_pipeline.storage.cache import CacheError, ShardCache


class PlannedSpans(Protocol):
    """What a reader reads (batches.TokenSpans, rows.RowSpans): its shards at a stream position."""

    reader: Any          # a batches.ShardReader: its `table`, `locate` and `forget`
    epoch_units: int

    def shards(self, pos: int) -> list[int]: ...


def local_consumers(cfg: WebDatasetConfig) -> int:
    """Readers sharing one node's cache: local ranks x DataLoader workers."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * max(1, cfg.num_workers)


def cache_limit_problem(cfg: WebDatasetConfig, max_shard_bytes: int) -> str | None:
    """The start-up check: the cache must hold every reader's prefetch window at once."""
    limit = parse_size(cfg.cache_limit)
    need = local_consumers(cfg) * max(1, cfg.prefetch_shards) * max_shard_bytes
    if limit >= need:
        return None
    return (f"data.cache_limit={cfg.cache_limit!r} ({limit:,} bytes) is smaller than the prefetch "
            f"window needs: {local_consumers(cfg)} readers on this node (local ranks x workers) x "
            f"data.prefetch_shards={cfg.prefetch_shards} x the largest shard ({max_shard_bytes:,} "
            f"bytes) = {need:,} bytes; raise data.cache_limit or lower data.prefetch_shards")


class Prefetcher:
    """The window of one reader (a rank, or one DataLoader worker of it); see module docstring."""

    def __init__(self, spans: PlannedSpans, cfg: WebDatasetConfig, *,
                 round_pos: Callable[[int], int], stride: int) -> None:
        """spans: what the reader reads (its ShardReader is pointed at the cache here);
        round_pos(k): stream position of the reader's round k; stride: rounds between its rounds."""
        self.spans, self.cfg, self.table = spans, cfg, spans.reader.table
        self.round_pos, self.stride = round_pos, stride
        self.depth = max(1, cfg.prefetch_shards)
        self.cache = ShardCache(cfg.cache_dir, parse_size(cfg.cache_limit))
        self.pool = ThreadPoolExecutor(min(self.depth, 8), thread_name_prefix="shard-fetch")
        self.futures: dict[int, Future] = {}
        self.rounds: deque[tuple[int, list[int]]] = deque()
        self.counts: dict[int, int] = {}
        self.next_round = 0
        spans.reader.locate, self.on_release = self.path, spans.reader.forget

    def _plan(self, k: int) -> list[int]:
        """Shards of round k, then of the following rounds, until `depth` distinct ones.

        Incremental: each round's pieces are computed once; `counts` holds the shards of the
        planned rounds in order of first appearance (a dict keeps insertion order)."""
        while self.rounds and self.rounds[0][0] < k:
            for s in self.rounds.popleft()[1]:
                self.counts[s] -= 1
                if not self.counts[s]:
                    del self.counts[s]
        if not self.rounds or self.rounds[0][0] != k:
            self.rounds.clear()
            self.counts.clear()
            self.next_round = k
        # a reader's rounds cover one epoch in epoch_tokens / period rounds; no need to look further
        period = max(1, self.round_pos(k + self.stride) - self.round_pos(k))
        horizon = self.spans.epoch_units // period + 2
        while len(self.counts) < self.depth and len(self.rounds) < horizon:
            shards = self.spans.shards(self.round_pos(self.next_round))
            self.rounds.append((self.next_round, shards))
            for s in shards:
                self.counts[s] = self.counts.get(s, 0) + 1
            self.next_round += self.stride
        window = list(self.rounds[0][1])
        for s in self.counts:
            if len(window) >= self.depth:
                break
            if s not in window:
                window.append(s)
        return window

    def advance(self, k: int) -> None:
        """Round k is next: move the window, pin and fetch what it needs, release the rest."""
        window = self._plan(k)
        for s in [s for s in self.futures if s not in window]:
            self.on_release(s)
            self.cache.unpin(self.table.paths[s])
            self.futures.pop(s)
        for s in window:
            if s not in self.futures:
                self.cache.pin(self.table.paths[s])
                self.futures[s] = self.pool.submit(self._fetch, s)

    def _fetch(self, s: int) -> str:
        url = self.table.paths[s]
        return str(self.cache.ensure(
            url, int(self.table.sizes[s]), self.table.sha256[s],
            lambda u, f: fetch_into(u, f, self.cfg.storage, self.cfg.retries, self.cfg.retry_backoff_s)))

    def path(self, s: int) -> str:
        """Local path of shard s (waits for its download); bad copies raise ShardFormatError."""
        fut = self.futures.get(s)
        if fut is None:  # outside the planned window (should not happen): fetch it now
            self.cache.pin(self.table.paths[s])
            fut = self.futures[s] = self.pool.submit(self._fetch, s)
        try:
            return fut.result()
        except CacheError as e:
            raise ShardFormatError(str(e)) from e
        except FetchError as e:  # retries exhausted mid-run: the trainer stops with a checkpoint
            raise DataSourceLost.from_fetch(e) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()
        self.futures.clear()
