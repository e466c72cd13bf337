"""The shard table: every usable document of a split, in table order, with its shard and offsets.

Built by `shard_table.build_table` (local shards) or `remote_table.remote_table` (a remote manifest);
everything downstream (order, batches, rows, prefetch) reads only this table.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.shared import numpy_fields, share_fields

PER_DOC = ("offsets", "lengths", "cum_tokens", "mask_offsets")
"""ShardTable's per-document arrays: shared with DataLoader workers, not copied (shared.py)."""


class DataWarning(UserWarning):
    """A shard or sample was skipped (data.on_error=skip)."""


class ShardError(ValueError):
    """A shard cannot be used and data.on_error=raise."""


@dataclass
class ShardTable:
    """Documents of all usable shards, in table order (global doc id g = row)."""

    paths: list[str]
    names: list[str]
    itemsize: np.ndarray       # per shard: 2 or 4
    n_docs: np.ndarray         # per shard
    n_tokens: np.ndarray       # per shard
    doc_base: np.ndarray       # per shard: first global doc id (len S + 1)
    offsets: np.ndarray        # per doc: byte offset of its data in its shard
    lengths: np.ndarray        # per doc: tokens
    cum_tokens: np.ndarray     # per doc: tokens before it in table order (len N + 1)
    vocab_size: int
    eos_token_id: int | None
    tokenizer_dir: str | None
    skipped: list[str] = field(default_factory=list)
    bad_samples: int = 0
    mask_offsets: np.ndarray | None = None
    """Chat shards: per doc, byte offset of its target mask (shard_format.py); None = text."""
    chat: dict[str, Any] | None = None
    """Chat shards: the manifest's `chat` entry (max_len, pad_token_id, ...); {} without one."""
    pairs: bool = False
    """Preference shards (prepare mode=preference): one (prompt, chosen, rejected) pair per doc."""
    remote: bool = False       # paths are URLs fetched lazily into the node cache (prefetch.py)
    sizes: np.ndarray | None = None   # remote: per shard, bytes the manifest promises
    sha256: list[str] | None = None   # remote: per shard, sha256 the manifest promises

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for each DataLoader worker: the per-document arrays go as shared memory, so a
        worker's start is O(shards), not O(documents) (shared.py)."""
        return share_fields(self, PER_DOC)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(numpy_fields(state, PER_DOC))

    @property
    def total_tokens(self) -> int:
        return int(self.cum_tokens[-1])

    @property
    def fingerprint(self) -> str:
        rows = [[p.rsplit("/", 1)[-1], int(d), int(t)] for p, d, t in
                zip(self.paths, self.n_docs, self.n_tokens)]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def mask_offsets_of(idxs: list[np.ndarray], names: list[str]) -> np.ndarray | None:
    """Per-doc mask offsets when every shard is a chat shard; None when none is."""
    chat = [n for n, i in zip(names, idxs) if i.shape[1] == 3]
    if not chat:
        return None
    if len(chat) != len(idxs):
        text = [n for n, i in zip(names, idxs) if i.shape[1] != 3]
        raise ValueError(f"data.urls mixes chat shards (with .mask members, e.g. {chat[0]}) and text "
                         f"shards (e.g. {text[0]}): train on one kind per run")
    return np.concatenate([i[:-1, 2] for i in idxs]).astype(np.int64)


def table_vocab(cfg: WebDatasetConfig, manifest: dict[str, Any] | None,
           mpath: Path | None) -> tuple[int, int | None, str | None]:
    vocab = manifest["vocab_size"] if manifest else None
    if cfg.vocab_size is not None:
        if vocab is not None and cfg.vocab_size < vocab:
            raise ValueError(f"data.vocab_size={cfg.vocab_size} is smaller than the manifest's "
                             f"vocab_size={vocab}; leave data.vocab_size=null")
        vocab = cfg.vocab_size
    if vocab is None:
        raise ValueError("data.vocab_size is null and no manifest.json describes these shards: "
                         "set data.vocab_size (or data.manifest)")
    tok = manifest.get("tokenizer") if manifest else None
    tok_dir = str((mpath.parent / tok["dir"]).resolve()) if mpath and tok and tok.get("dir") else None
    return vocab, manifest.get("eos_token_id") if manifest else None, tok_dir


def assemble(paths, names, idxs, sizes, vocab, eos, tok_dir, skipped, bad) -> ShardTable:
    n_docs = np.array([len(i) - 1 for i in idxs], dtype=np.int64)
    lengths = np.concatenate([np.diff(i[:, 1]) for i in idxs]).astype(np.int64)
    offsets = np.concatenate([i[:-1, 0] for i in idxs]).astype(np.int64)
    return ShardTable(
        paths=paths, names=names, itemsize=np.array(sizes, dtype=np.int64), n_docs=n_docs,
        n_tokens=np.array([int(i[-1, 1]) for i in idxs], dtype=np.int64),
        doc_base=np.concatenate([[0], np.cumsum(n_docs)]).astype(np.int64),
        offsets=offsets, lengths=lengths,
        cum_tokens=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        vocab_size=int(vocab), eos_token_id=eos, tokenizer_dir=tok_dir,
        skipped=skipped, bad_samples=bad, mask_offsets=mask_offsets_of(idxs, names))
