"""Typed settings of the data group (`conf/data/*.yaml`).

`data_pipeline` imports nothing of `train`; the trainer's schema embeds these classes.
Each class has `validate()` returning a list of problems (key, value seen, fix) so that
the trainer can collect every config error into one message before any process starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_pipeline.schema import minimums


@dataclass
class SyntheticDataConfig:
    """Deterministic token sequences for tests, the demo and benchmarks.

    The global sample order depends only on `seed` and the sample index, never on the
    world size, so runs on different numbers of ranks see the same global batches.
    """

    kind: Literal["synthetic"] = "synthetic"
    vocab_size: int = 256
    """Number of distinct token ids produced."""
    seed: int = 1234
    """Seed of the sample generator (independent of `trainer.seed`)."""

    def validate(self) -> list[str]:
        problems = []
        if self.vocab_size < 8:
            problems.append(f"data.vocab_size={self.vocab_size}: must be >= 8")
        return problems


@dataclass
class WebDatasetConfig:
    """Streaming loader over tokenized WebDataset tar shards written by `data_pipeline.prepare`.

    The global order of documents (and so of packed sequences) depends only on the shards and
    `seed`, never on the world size or `num_workers`; see data_pipeline/order.py.
    """

    kind: Literal["webdataset"] = "webdataset"
    urls: str = ""
    """Shards: a prepare output directory (or its manifest.json), or shard URLs: brace pattern,
    local path, file://, `a::b` lists, or pipe: (only with allow_pipe)."""
    val_urls: str = ""
    """Validation shard URLs; empty = the manifest's validation split next to `urls`."""
    manifest: str = ""
    """Path of manifest.json; empty = found next to the shards (their folder or its parent)."""
    allow_pipe: bool = False
    """Allow `pipe:` URLs, which run shell commands."""
    cache_dir: str = ""
    """Where pipe:/remote shards are copied for random access; empty = $TMPDIR/scaletrain-shards."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = build batches in the training process)."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    shuffle: bool = True
    """Shuffle shard order every epoch and documents within blocks of `shuffle_buffer`."""
    shuffle_buffer: int = 1000
    """Documents per seeded shuffle block (0 = keep documents in shard order)."""
    seed: int = 1234
    """Seed of shard-order and sample shuffling."""
    on_error: Literal["raise", "skip"] = "raise"
    """What a corrupt shard does: `raise` (stop, naming the shard) or `skip` (warn and count)."""
    verify: bool = False
    """Check every shard's sha256 against the manifest before reading it."""
    vocab_size: int | None = None
    """Filled from the manifest's tokenizer when null."""
    pack: bool = True
    """Chat shards: pack whole conversations into each row (true) or one conversation per
    row, right-padded with the tokenizer's pad id (false). Text shards are always packed."""

    def validate(self) -> list[str]:
        problems = []
        if not self.urls:
            problems.append("data.urls is empty: set data.urls=PATH/shard-{000000..000009}.tar "
                            "(shards written by `python -m data_pipeline.prepare`)")
        for key, value in (("data.urls", self.urls), ("data.val_urls", self.val_urls)):
            if "pipe:" in value and not self.allow_pipe:
                problems.append(f"{key}={value!r} is a pipe: command; set data.allow_pipe=true "
                                "to allow it (it runs a shell command)")
        problems += minimums("data", num_workers=(self.num_workers, 0), prefetch_factor=(self.prefetch_factor, 1),
                             shuffle_buffer=(self.shuffle_buffer, 0))
        if self.vocab_size is not None and self.vocab_size < 2:
            problems.append(f"data.vocab_size={self.vocab_size}: must be >= 2 or null")
        if self.manifest and not Path(self.manifest).is_file():
            problems.append(f"data.manifest={self.manifest!r} does not exist: point it at the "
                            "manifest.json written by prepare, or leave it empty")
        return problems


def _local_manifest(cfg: WebDatasetConfig) -> Path | None:
    """The manifest.json describing local data.urls, if one can be found without reading shards."""
    if cfg.manifest:
        return Path(cfg.manifest) if Path(cfg.manifest).is_file() else None
    first = cfg.urls.split("::")[0]
    first = first[len("file://"):] if first.startswith("file://") else first
    if not first or ":" in first.split("/", 1)[0]:
        return None
    import braceexpand

    p = Path(next(iter(braceexpand.braceexpand(first))))
    candidates = [p / "manifest.json"] if p.is_dir() else \
        [p] if p.suffix == ".json" else [p.parent / "manifest.json", p.parent.parent / "manifest.json"]
    return next((c for c in candidates if c.is_file()), None)


def chat_len_problems(cfg: WebDatasetConfig, seq_len: int) -> list[str]:
    """Chat shards whose conversations may be longer than a row: refused before start-up (a
    conversation is never cut across two rows). The loader checks the real lengths again."""
    path = _local_manifest(cfg)
    if path is None:
        return []
    try:
        m = json.loads(path.read_text())
        max_len = int(m["chat"]["max_len"]) if m.get("mode") == "chat" else None
    except (OSError, ValueError, KeyError, TypeError):
        return []  # the loader reports an unreadable manifest with its own message
    if max_len is not None and max_len > seq_len:
        return [f"data.urls={cfg.urls!r} holds chat shards of up to chat.max_len={max_len} tokens "
                f"({path}) but trainer.seq_len={seq_len}: set trainer.seq_len>={max_len}, or prepare "
                f"again with chat.max_len={seq_len}"]
    return []


def missing_local(urls: str, key: str) -> list[str]:
    """A problem when no local path in `urls` exists (the loader checks this at start-up;
    validate() does not, so that configs compose and validate before the data exists)."""
    if not urls or "pipe:" in urls:
        return []
    import braceexpand

    paths = [u[len("file://"):] if u.startswith("file://") else u
             for part in urls.split("::") for u in braceexpand.braceexpand(part)]
    local = [p for p in paths if ":" not in p.split("/", 1)[0]]
    missing = [p for p in local if not Path(p).exists()]
    if not local or len(missing) < len(local):
        return []
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return [f"{key}={urls!r}: {shown} does not exist; run `python -m data_pipeline.prepare "
            f"out=DIR` and set {key}=DIR (or the shard paths)"]

