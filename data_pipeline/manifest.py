"""`manifest.json`: what `prepare` wrote, so that the loader can plan without reading data.

Layout of an output directory (paths in the manifest are relative to it):

    manifest.json
    tokenizer/                 (when prepare tokenized; loadable with AutoTokenizer)
    train/shard-000000.tar     train/shard-000000.tar.idx.npy ...
    val/shard-000000.tar       val/shard-000000.tar.idx.npy ...

Keys: `format`, `fingerprint` (sources + settings; equal = rerunning prepare is a no-op),
`dtype`/`sample_ext`, `vocab_size`, `eos_token_id`, `tokenizer`, `splits.{train,val}` with
`samples`, `tokens`, `bytes` and `shards` (each: path, index, samples, tokens, bytes, sha256),
`totals`, `report` (documents read and skipped by reason) and `settings`.
`mode` is `text` (absent in older manifests: text too) or `chat`; a chat manifest adds
`chat`: {`max_len` (no sample is longer), `mask_ext` (`mask`, see shard_format.py),
`pad_token_id` (the tokenizer's pad id, or its EOS where it has none), `train_on`}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.fsutil import atomic_write_text
from data_pipeline.shard_format import TOKEN_EXTS, ShardRecord

MANIFEST_NAME = "manifest.json"
FORMAT = "scaletrain-shards/1"
SPLITS = ("train", "val")


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def build_manifest(*, splits: dict[str, list[ShardRecord]], ext: str, vocab_size: int,
                   eos_token_id: int | None, tokenizer: dict | None, fingerprint: str,
                   settings: dict | None = None, report: dict | None = None,
                   chat: dict | None = None) -> dict[str, Any]:
    """The manifest mapping for finished shards of every split."""
    out_splits = {}
    for name in SPLITS:
        recs = splits.get(name, [])
        out_splits[name] = {"samples": sum(r.samples for r in recs),
                            "tokens": sum(r.tokens for r in recs),
                            "bytes": sum(r.bytes for r in recs),
                            "shards": [r.to_json() for r in recs]}
    totals = {k: sum(s[k] for s in out_splits.values()) for k in ("samples", "tokens", "bytes")}
    totals["shards"] = sum(len(s["shards"]) for s in out_splits.values())
    extra = {"mode": "chat", "chat": chat} if chat is not None else {"mode": "text"}
    return {"format": FORMAT, "fingerprint": fingerprint, **extra, "dtype": TOKEN_EXTS[ext].name,
            "sample_ext": ext, "vocab_size": vocab_size, "eos_token_id": eos_token_id,
            "tokenizer": tokenizer, "splits": out_splits, "totals": totals,
            "report": report or {}, "settings": settings or {}}


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a manifest; errors name the file and what is wrong."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a scaletrain manifest (format={m.get('format')!r}, "
                         f"expected {FORMAT!r}); rerun `python -m data_pipeline.prepare`")
    return m


def manifest_is_current(root: Path, fingerprint: str) -> bool:
    """True when root holds a complete output of the same sources and settings."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        m = load_manifest(path)
    except ValueError:
        return False
    if m.get("fingerprint") != fingerprint:
        return False
    for split in m["splits"].values():
        for s in split["shards"]:
            p = root / s["path"]
            if not p.is_file() or p.stat().st_size != s["bytes"] or not (root / s["index"]).is_file():
                return False
    return True


def load_index(path: Path, samples: int, tokens: int, size: int, columns: int = 2) -> np.ndarray | None:
    """The (n+1, columns) index of a shard if it is consistent with the manifest entry, else
    None (columns: 2, or 3 for chat shards, see shard_format.py)."""
    try:
        idx = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if idx.ndim != 2 or idx.shape != (samples + 1, columns):
        return None
    if int(idx[-1, 0]) != size or int(idx[-1, 1]) != tokens:
        return None
    return idx
