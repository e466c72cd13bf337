"""Typed settings of the data group (`conf/data/*.yaml`).

`data_pipeline` imports nothing of `train`; the trainer's schema embeds these classes.
Each class has `validate()` returning a list of problems (key, value seen, fix) so that
the trainer can collect every config error into one message before any process starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_pipeline.schema import minimums
from data_pipeline.storage.backends import StorageConfig, backend_problem, is_remote, parse_size


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
    doc_len: int = 0
    """Packed documents: position ids restart at document starts, document lengths drawn uniformly
    from 1 .. 2 * doc_len - 1 per row (mean doc_len), as chat SFT batches are packed; the attention
    kernels then apply the document mask. 0 = one document per row (positions 0 .. seq_len - 1).
    The tokens are the same either way."""

    def validate(self) -> list[str]:
        problems = []
        if self.vocab_size < 8:
            problems.append(f"data.vocab_size={self.vocab_size}: must be >= 8")
        if self.doc_len < 0:
            problems.append(f"data.doc_len={self.doc_len}: must be >= 0 (0 = one document per row)")
        return problems


@dataclass
class WebDatasetConfig:
    """Streaming loader over tokenized WebDataset tar shards written by `data_pipeline.prepare`.

    The global order of documents (and so of packed sequences) depends only on the shards and
    `seed`, never on the world size or `num_workers`; see data_pipeline/read/order.py.
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
    """Per-node cache of remote (and pipe:) shards, shared by the node's ranks and workers;
    empty = $TMPDIR/scaletrain-shards. On a cluster: node-local disk, not a shared file system."""
    cache_limit: str | int = "50GB"
    """Size bound of the cache (e.g. 50GB, 800KB); consumed shards are evicted to stay under it."""
    prefetch_shards: int = 4
    """Remote shards each reader fetches ahead of need, in background threads."""
    retries: int = 5
    """Retries of a transient storage error (HTTP 5xx/429/408, reset, timeout)."""
    retry_backoff_s: float = 0.5
    """First retry delay; doubled after each retry."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Remote storage settings (S3 endpoint, timeout); credentials come from the standard chains."""
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
        problems.extend(self._remote_problems())
        if self.manifest and not is_remote(self.manifest) and not Path(self.manifest).is_file():
            problems.append(f"data.manifest={self.manifest!r} does not exist: point it at the "
                            "manifest.json written by prepare, or leave it empty")
        return problems

    def _remote_problems(self) -> list[str]:
        problems = []
        try:
            parse_size(self.cache_limit)
        except ValueError as e:
            problems.append(f"data.cache_limit: {e}")
        if self.prefetch_shards < 1:
            problems.append(f"data.prefetch_shards={self.prefetch_shards}: must be >= 1")
        if self.retries < 0 or self.retry_backoff_s < 0:
            problems.append(f"data.retries={self.retries}, data.retry_backoff_s={self.retry_backoff_s}: "
                            "must be >= 0")
        if self.storage.timeout_s <= 0:
            problems.append(f"data.storage.timeout_s={self.storage.timeout_s}: must be > 0")
        for key, value in (("data.urls", self.urls), ("data.val_urls", self.val_urls),
                           ("data.manifest", self.manifest)):
            problem = backend_problem(value) if value else None
            if problem:
                problems.append(f"{key}={value!r}: {problem}")
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



def missing_val_split(cfg: SyntheticDataConfig | WebDatasetConfig) -> list[str]:
    """A problem when evaluation is on but the data has no validation split (checked at start-up,
    not at the first evaluation after the steps before it were trained and not yet checkpointed)."""
    if not isinstance(cfg, WebDatasetConfig) or cfg.val_urls or not cfg.urls or "::" in cfg.urls:
        return []
    loc = cfg.urls[len("file://"):] if cfg.urls.startswith("file://") else cfg.urls
    candidates = [Path(cfg.manifest)] if cfg.manifest else []
    if "{" not in loc and ":" not in loc.split("/", 1)[0]:
        p = Path(loc)
        candidates += [p] if p.suffix == ".json" else [p / "manifest.json", p.parent / "manifest.json",
                                                        p.parent.parent / "manifest.json"]
    elif ":" not in loc.split("/", 1)[0]:  # a brace pattern: the manifest sits by its folder
        p = Path(loc.split("{", 1)[0]).parent
        candidates += [p / "manifest.json", p.parent / "manifest.json"]
    else:
        return []  # remote shards: the loader checks the remote manifest at start-up
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return [] if missing_local(cfg.urls, "data.urls") else [
            f"trainer.eval_every>0 but data.val_urls is empty and no manifest.json next to data.urls={cfg.urls!r} "
            "names a validation split: set data.val_urls to the validation shards, or trainer.eval_every=0"]
    if _val_shards(found):
        return []
    return [f"trainer.eval_every>0 but data.val_urls is empty and {found} lists no validation shards: set "
            "data.val_urls to validation shards, prepare the data with split.val_fraction > 0, or set "
            "trainer.eval_every=0"]


def _val_shards(manifest: Path) -> bool:
    """True when the manifest lists validation shards; an unreadable one is the loader's to report."""
    import json

    try:
        m = json.loads(manifest.read_bytes())
        return bool(m["splits"]["val"]["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True
