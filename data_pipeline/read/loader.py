"""`data=webdataset`: packed micro-batches from tokenized tar shards, exactly resumable.

Rank r of W, in round k (its k-th micro-batch), takes the stream span of global batch number
k*W + r (see order.py and batches.py). DataLoader worker i of K produces rounds i, i+K, ...,
which the DataLoader hands back strictly in round order. The loader counts the rounds the
trainer has *consumed* (not what workers prefetched; stream.py, shared with the mixture of
mix.py), so its state is one stream position,
identical on every rank:

    position = base + consumed_rounds * W * B * T        (tokens of the global stream)

`load_state_dict` and `load_elastic` (any old world size) both continue at that position:
nothing is seen twice or skipped, and no partly packed buffer exists to lose.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import torch

from data_pipeline.read.batches import ShardReader, TokenSpans
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.order import GlobalOrder
from data_pipeline.read.pairs import PairSpans, pair_spans
from data_pipeline.read.rows import RowOrder, RowSpans
from data_pipeline.read.shard_table import DataWarning, ShardTable, build_table
from data_pipeline.read.stream import (
    RankStream,
    Taken,
    check_same_world,
    check_shape,
    elastic_start,
    prestart_workers,
)

STATE_VERSION = 1


def epoch_units(spans: TokenSpans | RowSpans, epochs: float) -> int:
    """Stream units (tokens of text, rows of chat) that `epochs` passes over the data cover
    (rounded up); packed chat epochs differ in rows (each epoch's order packs differently)."""
    if isinstance(spans, TokenSpans):
        return math.ceil(epochs * spans.order.epoch_tokens)
    whole, frac = int(epochs), epochs - int(epochs)
    rows = sum(spans.order.rows_in(e) for e in range(whole))
    return rows + math.ceil(frac * spans.order.rows_in(whole)) if frac else rows


def make_spans(table: ShardTable, order: GlobalOrder, cfg: WebDatasetConfig, rows: int,
               seq_len: int) -> TokenSpans | RowSpans | PairSpans:
    """Text shards stream tokens; chat shards (with masks) come as whole conversations per row."""
    if table.pairs:  # preference pairs for objective=dpo
        return pair_spans(table, order, rows, seq_len, cfg.on_error)
    reader = ShardReader(table)
    if table.mask_offsets is None:
        if not cfg.pack:
            raise ValueError("data.pack=false pads one conversation per row, but these shards are "
                             "text (no .mask members): prepare them with mode=chat, or set data.pack=true")
        return TokenSpans(order, reader, rows, seq_len, cfg.on_error)
    longest = int(table.lengths.max())
    if longest > seq_len:
        raise ValueError(f"chat shards hold a conversation of {longest} tokens > trainer.seq_len="
                         f"{seq_len} (a conversation is never cut across rows): raise trainer.seq_len "
                         f"or prepare again with chat.max_len<={seq_len}")
    pad = (table.chat or {}).get("pad_token_id")
    pad = pad if pad is not None else (table.eos_token_id if table.eos_token_id is not None else 0)
    return RowSpans(RowOrder(order, seq_len, cfg.pack), reader, rows, seq_len, pad, cfg.on_error)


class WebDatasetLoader:
    """Follows `data_pipeline.Loader` for shards written by `python -m data_pipeline.prepare`
    (or any tars of `.u16`/`.u32` token arrays; see shard_format.py).

    Text shards: the stream position counts tokens. Chat shards (`.mask` members): batches of
    whole conversations (rows.py) and the position counts rows; everything else (workers,
    resume, elastic resume) is the same."""

    def __init__(self, cfg: WebDatasetConfig, *, rank: int, world_size: int,
                 micro_batch_size: int, seq_len: int, split: str = "train",
                 pin_memory: bool = False) -> None:
        check_shape(rank, world_size, micro_batch_size, seq_len)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        self.cfg, self.split = cfg, split
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.table = build_table(cfg, split)
        self.order = GlobalOrder(self.table, cfg.seed, cfg.shuffle_buffer, shuffle=cfg.shuffle)
        self.vocab_size = self.table.vocab_size
        self.tokenizer_dir = self.table.tokenizer_dir
        self.eos_token_id = self.table.eos_token_id
        self.data_fingerprint = self.table.fingerprint
        self._spans = make_spans(self.table, self.order, cfg, micro_batch_size, seq_len)
        self.unit = getattr(self._spans, "unit_name", "rows" if isinstance(self._spans, RowSpans) else "tokens")
        self.pairs = self.unit == "pairs"
        self._base = 0
        self._taken = Taken()
        self._repeated_tokens = 0
        prestart_workers(cfg)

    @property
    def position(self) -> int:
        """Tokens (chat: rows) of the global stream consumed by all ranks together."""
        return self._base + self._taken.rounds * self.world_size * self._spans.unit

    def _stream(self) -> RankStream:
        return RankStream(self._spans, base=self._base, first_round=self._taken.rounds,
                          rank=self.rank, world_size=self.world_size,
                          remote=[(self._spans, self.cfg)] if self.table.remote else [])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._taken.batches(self._stream, self.cfg, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "webdataset", "version": STATE_VERSION, "split": self.split,
                "position": self.position, "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "seq_len": self.seq_len,
                "seed": self.cfg.seed, "data_fingerprint": self.data_fingerprint,
                **({"unit": "rows", "pack": self.cfg.pack} if self.unit == "rows" else {}),
                **({"unit": "pairs"} if self.pairs else {}),
                "masked_tokens": self._taken.masked_tokens, "repeated_tokens": self._repeated_tokens}

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "webdataset" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a webdataset loader state (kind={state.get('kind')!r}, "
                             f"version={state.get('version')!r}); was the run using another data=?")
        if state.get("unit", "tokens") != self.unit:
            raise ValueError(f"loader state counts {state.get('unit', 'tokens')} but these shards are "
                             f"{'chat' if self.unit == 'rows' else 'text'} shards (counted in "
                             f"{self.unit}): resume with the data the checkpoint was trained on")
        if self.unit == "rows":
            for key, mine in (("seq_len", self.seq_len), ("pack", self.cfg.pack)):
                if state.get(key) != mine:  # rows are packed for one seq_len
                    warnings.warn(f"loader state has {key}={state.get(key)!r} but this loader has "
                                  f"{mine!r}: chat rows are packed differently, so the continuation "
                                  "is not the uninterrupted order", DataWarning, stacklevel=3)
        for key, mine in (("data_fingerprint", self.data_fingerprint), ("seed", self.cfg.seed)):
            if state.get(key) != mine:
                warnings.warn(f"loader state has {key}={state.get(key)!r} but this loader has "
                              f"{mine!r}: the shards or seed changed since the checkpoint, so the "
                              "continuation is not the uninterrupted order", DataWarning, stacklevel=3)

    def _restart_at(self, position: int) -> None:
        self._base = int(position)
        self._taken.restart()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        check_same_world(state, self.world_size)
        self._taken.masked_tokens = int(state.get("masked_tokens", 0))
        self._repeated_tokens = int(state.get("repeated_tokens", 0))
        self._restart_at(state["position"])

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        """Continue from a run with another world size: every old rank's state, any order."""
        for s in states:  # here, so that their warnings point at the caller
            self._check(s)
        earliest, spread = elastic_start(states)
        if spread:
            # Ranks of a lockstep run agree; if not, resume at the earliest so nothing is skipped.
            self._repeated_tokens += spread
            positions = sorted({int(s["position"]) for s in states})
            warnings.warn(f"old ranks disagree on the stream position {positions}; "
                          f"resuming at the earliest, {spread} tokens repeat", DataWarning, stacklevel=2)
        self._taken.masked_tokens = max(int(s.get("masked_tokens", 0)) for s in states)
        self._restart_at(earliest["position"])

    def epoch_units(self, epochs: float) -> tuple[int, str, str]:
        """(stream units, `tokens` or `rows`, how they were counted) of `epochs` passes (train/epochs.py)."""
        units = epoch_units(self._spans, epochs)
        if self.unit == "tokens":
            return units, "tokens", f"{epochs:g} x {self.order.epoch_tokens:,} tokens"
        if not self.cfg.pack:
            return units, "rows", f"{epochs:g} x {self.order.num_docs:,} conversations"
        return units, "rows", f"{units:,} packed rows ({epochs:g} epochs)"

    def metrics(self) -> dict[str, float]:
        """Cheap counters: epochs and tokens of the global stream consumed, data problems."""
        return {"data_epoch": self._spans.epoch_of(self.position),
                f"data_{self.unit}": float(self.position),
                "data_skipped_shards": float(len(self.table.skipped)),
                "data_bad_samples": float(self.table.bad_samples),
                "data_masked_tokens": float(self._taken.masked_tokens),
                "data_elastic_lost_tokens": 0.0,
                "data_elastic_repeated_tokens": float(self._repeated_tokens)}
