"""`data.mix`: several prepared datasets with weights, as one world-size-independent stream.

Each source keeps its own global order (order.py; rows.py for chat), read one row at a time:
row j of a text source is tokens [j*T, j*T + T + 1) of its stream (exactly the rows a
single-dataset batch cuts), row j of a chat source is its j-th packed row. The mixed stream
is a sequence of global rows i = 0, 1, 2, ...; row i comes from source `schedule.source(i)`
and is that source's next unread row. The schedule is a smooth weighted round robin (nginx's
algorithm) over the weights quantised to 1/1000 and reduced: 0.7/0.3 repeats
A A B A A B A A B A, so after any prefix of n rows every source has within one row of its
weight x n. It is a pure function of the weights, so the rows are the same on every world
size; micro-batch g (rank r of W, round k: g = k*W + r) is rows [g*B, (g+1)*B), as in loader.py.

Resume: the state is the global row index and, per source, its stream position at that row;
continuing from them is exact on any world size, micro-batch size (and, for text, seq_len),
and the per-source token counts in the metrics follow from the positions alone.
"""
from __future__ import annotations

import math
import warnings
from functools import reduce
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from data_pipeline.read.batches import Span, TokenSpans
from data_pipeline.read.config import (
    SourceKind,
    WebDatasetConfig,
    file_digest,
    kind_conflicts,
    source_configs,
)
from data_pipeline.read.loader import epoch_units, make_spans
from data_pipeline.read.order import GlobalOrder
from data_pipeline.read.rows import RowSpan, RowSpans
from data_pipeline.read.shard_table import DataWarning, ShardTable, build_table
from data_pipeline.read.stream import (
    RankStream,
    Taken,
    check_same_world,
    check_shape,
    elastic_start,
    prestart_workers,
)
from data_pipeline.schema import ConfigError

STATE_VERSION = 1
RESOLUTION = 1000


class Schedule:
    """Which source each global row comes from, and how many rows of each precede a row."""

    def __init__(self, weights: list[float], names: list[str]) -> None:
        total = float(sum(weights))
        exact = [w / total * RESOLUTION for w in weights]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:RESOLUTION - sum(counts)]:
            counts[i] += 1   # largest remainders first: the counts sum to RESOLUTION
        small = [n for n, c in zip(names, counts) if c == 0]
        if small:
            raise ConfigError([f"data.mix: the weight of {small} is under 1/{RESOLUTION} of the total "
                               f"weight {total:g}; raise it or drop the source"])
        g = reduce(math.gcd, counts)
        self.counts = np.array([c // g for c in counts], dtype=np.int64)
        self.period = int(self.counts.sum())
        current = np.zeros(len(counts), dtype=np.int64)
        seq = np.empty(self.period, dtype=np.int64)
        for i in range(self.period):  # smooth weighted round robin
            current += self.counts
            seq[i] = s = int(np.argmax(current))
            current[s] -= self.period
        self.seq = seq
        self.prefix = np.zeros((self.period + 1, len(counts)), dtype=np.int64)
        self.prefix[np.arange(1, self.period + 1), seq] = 1
        self.prefix = np.cumsum(self.prefix, axis=0)

    def source(self, i: int) -> int:
        return int(self.seq[i % self.period])

    def before(self, i: int) -> np.ndarray:
        """Rows of each source among global rows 0 .. i - 1."""
        q, r = divmod(int(i), self.period)
        return q * self.counts + self.prefix[r]


class MixSpan(NamedTuple):
    """One mixed micro-batch as a worker hands it over: a one-row span per row, and its source."""

    sources: list[int]
    rows: list[Span | RowSpan]
    notes: dict[str, Any]


class MixSpans:
    """What a loader worker needs for a mix: global row number -> MixSpan -> batch. `unit` is B
    rows; `start` is the global row the source positions `bases` belong to."""

    def __init__(self, sources: list[TokenSpans | RowSpans], schedule: Schedule, rows: int,
                 start: int, bases: list[int]) -> None:
        self.sources, self.schedule, self.unit = sources, schedule, rows
        self.start, self.bases = int(start), [int(b) for b in bases]
        self._before_start = schedule.before(start)

    def position(self, s: int, i: int) -> int:
        """Stream position, in source s, of its first row at or after global row i."""
        step = self.sources[s].unit   # T tokens (text) or 1 row (chat)
        return self.bases[s] + int(self.schedule.before(i)[s] - self._before_start[s]) * step

    def _rows(self, pos: int) -> list[tuple[int, int]]:
        """(source, position in it) of global rows pos .. pos + B - 1."""
        done = (self.schedule.before(pos) - self._before_start).tolist()  # rows of each source read
        out = []
        for i in range(pos, pos + self.unit):
            s = self.schedule.source(i)
            out.append((s, self.bases[s] + done[s] * self.sources[s].unit))
            done[s] += 1
        return out

    def read(self, pos: int) -> MixSpan:
        plan = self._rows(pos)
        rows = [self.sources[s].read(p) for s, p in plan]
        notes = {"masked_tokens": sum(r.notes["masked_tokens"] for r in rows),
                 "bad": [m for r in rows for m in r.notes["bad"]]}
        return MixSpan([s for s, _ in plan], rows, notes)

    def source_shards(self, s: int, pos: int) -> list[int]:
        """The shards of source s that read(pos) reads (prefetch.py plans with it)."""
        out: dict[int, None] = {}
        for src, p in self._rows(pos):
            if src == s:
                out.update(dict.fromkeys(self.sources[s].shards(p)))
        return list(out)

    def finish(self, span: MixSpan) -> dict[str, torch.Tensor]:
        parts = [self.sources[s].finish(row) for s, row in zip(span.sources, span.rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        for spans in self.sources:
            spans.close()


class _SourcePlan:
    """prefetch.PlannedSpans for one remote source of a mix, in global (mixed) row positions."""

    def __init__(self, mix: MixSpans, s: int, share: float) -> None:
        self.mix, self.s = mix, s
        self.reader = mix.sources[s].reader
        src = mix.sources[s]
        self.epoch_units = math.ceil(src.epoch_units / src.unit / share) + 1  # mixed rows per source epoch

    def shards(self, pos: int) -> list[int]:
        return self.mix.source_shards(self.s, pos)


class MixLoader:
    """Follows `data_pipeline.Loader` for `data.mix` (see the module docstring)."""

    def __init__(self, cfg: WebDatasetConfig, *, rank: int, world_size: int,
                 micro_batch_size: int, seq_len: int, split: str = "train",
                 pin_memory: bool = False) -> None:
        check_shape(rank, world_size, micro_batch_size, seq_len)
        self.cfg, self.split = cfg, split
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.pin_memory = pin_memory and torch.cuda.is_available()
        sources = source_configs(cfg)
        self.names = [n for n, _, _ in sources]
        self.weights = [w for _, w, _ in sources]
        self.configs = [c for _, _, c in sources]
        self.tables: list[ShardTable] = [build_table(c, split) for c in self.configs]
        self._check_kinds()
        self.orders = [GlobalOrder(t, c.seed, c.shuffle_buffer, shuffle=c.shuffle)
                       for t, c in zip(self.tables, self.configs)]
        self.sources = [make_spans(t, o, c, 1, seq_len) for t, o, c in zip(self.tables, self.orders, self.configs)]
        self.unit = "rows"
        self.vocab_size = self.tables[0].vocab_size
        self.tokenizer_dir = self.tables[0].tokenizer_dir
        self.eos_token_id = self.tables[0].eos_token_id
        self.data_fingerprint = ",".join(t.fingerprint for t in self.tables)
        self.schedule = Schedule(self.weights, self.names)
        self._start, self._bases = 0, [0] * len(self.sources)
        self._taken = Taken()
        self._repeated_rows = 0
        prestart_workers(cfg)

    def _check_kinds(self) -> None:
        kinds = []
        for name, t in zip(self.names, self.tables):
            tok = file_digest(Path(t.tokenizer_dir) / "tokenizer.json") if t.tokenizer_dir else None
            kinds.append(SourceKind(name, "text" if t.mask_offsets is None else "chat", t.vocab_size,
                                    t.eos_token_id, tok))
        problems = kind_conflicts(kinds)
        if problems:
            raise ConfigError(problems, what="data.mix")

    @property
    def position(self) -> int:
        """Global (mixed) rows consumed by all ranks together."""
        return self._start + self._taken.rounds * self.world_size * self.micro_batch_size

    def _spans(self) -> MixSpans:
        return MixSpans(self.sources, self.schedule, self.micro_batch_size, self._start, self._bases)

    def source_positions(self, row: int | None = None) -> list[int]:
        """Each source's stream position (tokens of text, rows of chat) at global row `row`."""
        spans = self._spans()
        row = self.position if row is None else row
        return [spans.position(s, row) for s in range(len(self.sources))]

    def _stream(self) -> RankStream:
        spans = self._spans()
        shares = self.schedule.counts / self.schedule.period
        remote = [(_SourcePlan(spans, s, float(shares[s])), c)
                  for s, (t, c) in enumerate(zip(self.tables, self.configs)) if t.remote]
        return RankStream(spans, base=self._start, first_round=self._taken.rounds, rank=self.rank,
                          world_size=self.world_size, remote=remote)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._taken.batches(self._stream, self.cfg, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "webdataset_mix", "version": STATE_VERSION, "split": self.split,
                "position": self.position, "source_positions": self.source_positions(),
                "names": list(self.names), "weights": [float(w) for w in self.weights],
                "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "seq_len": self.seq_len,
                "seed": self.cfg.seed, "pack": self.cfg.pack, "data_fingerprint": self.data_fingerprint,
                "masked_tokens": self._taken.masked_tokens, "repeated_rows": self._repeated_rows}

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "webdataset_mix" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data.mix loader state (kind={state.get('kind')!r}, version="
                             f"{state.get('version')!r}): the checkpoint was trained with another data= "
                             "(resume with the data it was trained on, or start a new run.dir)")
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"loader state has data.mix sources {state.get('names')} but this run has "
                             f"{self.names}: resume with the same sources in the same order")
        for key, mine in (("data_fingerprint", self.data_fingerprint), ("seed", self.cfg.seed),
                          ("weights", [float(w) for w in self.weights]), ("pack", self.cfg.pack)):
            if state.get(key) != mine:
                warnings.warn(f"loader state has {key}={state.get(key)!r} but this loader has {mine!r}: "
                              "the continuation is not the uninterrupted order", DataWarning, stacklevel=3)

    def _restart_at(self, state: dict[str, Any]) -> None:
        self._start, self._bases = int(state["position"]), [int(p) for p in state["source_positions"]]
        self._taken.restart()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        check_same_world(state, self.world_size)
        self._taken.masked_tokens = int(state.get("masked_tokens", 0))
        self._repeated_rows = int(state.get("repeated_rows", 0))
        self._restart_at(state)

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        """Continue from a run with another world size: every old rank's state, any order."""
        for s in states:  # here, so that their warnings point at the caller
            self._check(s)
        earliest, spread = elastic_start(states)
        if spread:  # ranks of a lockstep run agree; if not, resume at the earliest so nothing is skipped
            self._repeated_rows += spread
            warnings.warn(f"old ranks disagree on the mixed row position; resuming at the earliest, "
                          f"{spread} rows repeat", DataWarning, stacklevel=2)
        self._taken.masked_tokens = max(int(s.get("masked_tokens", 0)) for s in states)
        self._restart_at(earliest)

    def epoch_units(self, epochs: float) -> tuple[int, str, str]:
        """(mixed rows, `rows`, how they were counted) of `epochs` passes: one epoch of a mix is the
        sum of its sources' epochs (text: tokens / seq_len rows), whatever the weights."""
        per_source = []
        for spans in self.sources:
            units = epoch_units(spans, epochs)
            per_source.append(units / spans.unit)
        parts = " + ".join(f"{n}: {epochs:g} x {self._epoch_size(s)}" for s, n in enumerate(self.names))
        rows = math.ceil(sum(per_source))
        return rows, "rows", f"{rows:,} rows ({parts})"

    def _epoch_size(self, s: int) -> str:
        spans = self.sources[s]
        if isinstance(spans, TokenSpans):
            return f"{spans.order.epoch_tokens:,} tokens / {self.seq_len}"
        return f"{spans.order.rows_in(0):,} rows"

    def metrics(self) -> dict[str, float]:
        """Global counters: mixed rows, and per source (by name) real tokens and epochs consumed."""
        out = {"data_rows": float(self.position),
               "data_skipped_shards": float(sum(len(t.skipped) for t in self.tables)),
               "data_bad_samples": float(sum(t.bad_samples for t in self.tables)),
               "data_masked_tokens": float(self._taken.masked_tokens),
               "data_elastic_repeated_rows": float(self._repeated_rows)}
        for name, spans, pos in zip(self.names, self.sources, self.source_positions()):
            tokens = pos if isinstance(spans, TokenSpans) else spans.order.tokens_before(pos)
            out[f"data/tokens/{name}"] = float(tokens)
            out[f"data/epoch/{name}"] = float(spans.epoch_of(pos))
        return out
