"""Typed settings of the data group (`conf/data/*.yaml`).

`data_pipeline` imports nothing of `train`; the trainer's schema embeds these classes.
Each class has `validate()` returning a list of problems (key, value seen, fix) so that
the trainer can collect every config error into one message before any process starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
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
class MixSource:
    """One prepared dataset of `data.mix` (the other data.* settings are shared by every source)."""

    urls: str = ""
    """The source's shards, in any form `data.urls` accepts (local or remote)."""
    weight: float = 1.0
    """Share of the mixed rows drawn from this source (weights are normalised; honoured to 1/1000)."""
    name: str = ""
    """Name in the metrics (`data/tokens/<name>`, `data/epoch/<name>`); empty = the basename of urls."""
    val_urls: str = ""
    """Validation shards; empty = the manifest's validation split next to `urls`."""
    manifest: str = ""
    """Path of the source's manifest.json; empty = found next to its shards."""


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
    mix: list[MixSource] = field(default_factory=list)
    """Several prepared datasets with weights, instead of `urls` (data=mix): each row of the global
    stream comes from one source, chosen by a smooth weighted round robin (see read/mix.py)."""

    def validate(self) -> list[str]:
        problems = []
        if self.mix and self.urls:
            problems.append(f"data.urls={self.urls!r} and data.mix are both set: use one of them "
                            "(data=mix starts with data.urls empty, or set data.urls='')")
        elif not self.urls and not self.mix:
            problems.append("data.urls is empty: set data.urls=PATH/shard-{000000..000009}.tar "
                            "(shards written by `python -m data_pipeline.prepare`), or data.mix="
                            "[{urls: A, weight: 0.7}, {urls: B, weight: 0.3}]")
        problems.extend(_mix_problems(self.mix))
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
        sources = [(f"data.mix[{i}].{k}", getattr(src, k)) for i, src in enumerate(self.mix)
                   for k in ("urls", "val_urls", "manifest")]
        for key, value in (("data.urls", self.urls), ("data.val_urls", self.val_urls),
                           ("data.manifest", self.manifest), *sources):
            problem = backend_problem(value) if value else None
            if problem:
                problems.append(f"{key}={value!r}: {problem}")
        return problems


def source_name(src: MixSource, index: int) -> str:
    """A mix source's name in the metrics: its `name`, else the last meaningful part of its urls
    (`/data/chat_en/` -> `chat_en`; `/data/code/train/shard-{000000..000009}.tar` -> `code`)."""
    if src.name:
        return src.name
    parts = [p for p in src.urls.split("::")[0].rstrip("/").split("/") if p]
    while parts and (parts[-1] in ("manifest.json", "train", "val") or parts[-1].endswith(".tar")
                     or any(c in parts[-1] for c in "{*?")):
        parts.pop()
    return parts[-1] if parts and ":" not in parts[-1] else f"source{index}"


def _mix_problems(mix: list[MixSource]) -> list[str]:
    import math

    problems = []
    for i, src in enumerate(mix):
        if not src.urls:
            problems.append(f"data.mix[{i}].urls is empty: set it to a prepare output (or its shard URLs)")
        if not (math.isfinite(src.weight) and src.weight > 0):
            problems.append(f"data.mix[{i}].weight={src.weight}: must be a number > 0")
        for key in ("urls", "val_urls"):
            if "pipe:" in getattr(src, key):
                problems.append(f"data.mix[{i}].{key} is a pipe: command; mix sources take local or "
                                "remote shards only")
    names = [source_name(s, i) for i, s in enumerate(mix)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"data.mix: sources {names} share the name(s) {twice}: give each a distinct "
                        "`name` (data.mix=[{urls: A, weight: 0.7, name: a}, ...])")
    return problems


def source_configs(cfg: WebDatasetConfig) -> list[tuple[str, float, WebDatasetConfig]]:
    """(name, weight, config) of every source: the mix's sources, each with the shared settings,
    or the one dataset of data.urls (named by its urls, weight 1)."""
    if not cfg.mix:
        return [(source_name(MixSource(urls=cfg.urls), 0), 1.0, cfg)]
    return [(source_name(src, i), src.weight,
             replace(cfg, urls=src.urls, val_urls=src.val_urls, manifest=src.manifest, mix=[]))
            for i, src in enumerate(cfg.mix)]


def mix_kind_problems(cfg: WebDatasetConfig) -> list[str]:
    """Sources of a mix that cannot be mixed, told from their local manifests before start-up:
    chat with text shards, or different vocabularies / EOS / tokenizers (the loader checks again,
    remote sources included)."""
    if len(cfg.mix) < 2:
        return []
    seen = []
    for name, _, scfg in source_configs(cfg):
        path = _local_manifest(scfg)
        try:
            m = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            m = None
        if isinstance(m, dict):
            tok = m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {}
            tok_file = path.parent / str(tok.get("dir", "")) / "tokenizer.json" if tok.get("dir") else None
            seen.append(SourceKind(name, "chat" if m.get("mode") == "chat" else "text", m.get("vocab_size"),
                                   m.get("eos_token_id"), file_digest(tok_file)))
    return kind_conflicts(seen)


@dataclass
class SourceKind:
    """What must agree between the sources of a mix."""

    name: str
    mode: str                 # chat | text
    vocab_size: int | None
    eos_token_id: int | None
    tokenizer: str | None     # sha256 of tokenizer.json where known


def file_digest(path: Path | None) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path and path.is_file() else None
    except OSError:
        return None


def kind_conflicts(kinds: list[SourceKind]) -> list[str]:
    """Problems naming the sources that disagree with the first one."""
    if not kinds:
        return []
    first, problems = kinds[0], []
    for k in kinds[1:]:
        if k.mode != first.mode:
            problems.append(f"data.mix mixes {first.mode} shards ({first.name}) with {k.mode} shards "
                            f"({k.name}): a mix must be all chat or all text; prepare both with the same mode")
        for what in ("vocab_size", "eos_token_id", "tokenizer"):
            a, b = getattr(first, what), getattr(k, what)
            if a is not None and b is not None and a != b:
                problems.append(f"data.mix sources {first.name} and {k.name} have different {what} "
                                f"({a} vs {b}): their tokens mean different things; prepare them with "
                                "the same tokenizer")
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
