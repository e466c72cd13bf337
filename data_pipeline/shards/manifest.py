"""`manifest.json`: what `prepare` wrote, so that the loader can plan without reading data.

Layout of an output directory (paths in the manifest are relative to it):

    manifest.json              (written last: for a remote `out`, the commit marker)
    indexes.npy                (every shard's index in one array: one GET at start-up)
    tokenizer/                 (when prepare tokenized; loadable with AutoTokenizer)
    train/shard-000000.tar     train/shard-000000.tar.idx.npy ...
    val/shard-000000.tar       val/shard-000000.tar.idx.npy ...

Keys: `format`, `fingerprint` (sources + settings; equal = rerunning prepare is a no-op),
`dtype`/`sample_ext`, `vocab_size`, `eos_token_id`, `tokenizer`, `splits.{train,val}` with
`samples`, `tokens`, `bytes` and `shards` (each: path, index, samples, tokens, bytes, sha256),
`totals`, `report` (documents read and skipped by reason), `settings` and `index_bundle`
(`indexes.npy`: every shard's index in one array, train then val, for one-GET start-up).
`mode` is `text` (absent in older manifests: text too) or `chat`; a chat manifest adds
`chat`: {`max_len` (no sample is longer), `mask_ext` (`mask`, see shard_format.py),
`pad_token_id` (the tokenizer's pad id, or its EOS where it has none), `train_on`}.
`mode` `preference` (prepare/preference.py) stores one pair per sample with a mask as chat does
(values 0 prompt, 1 chosen, 2 rejected) and adds `preference`: {`max_len`, `pad_token_id`, ...}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.fsutil import atomic_write_text, file_sha256
from data_pipeline.shards.format import TOKEN_EXTS, ShardRecord

MANIFEST_NAME = "manifest.json"
INDEX_BUNDLE = "indexes.npy"
FORMAT = "scaletrain-shards/1"
SPLITS = ("train", "val")


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def build_manifest(*, splits: dict[str, list[ShardRecord]], ext: str, vocab_size: int,
                   eos_token_id: int | None, tokenizer: dict | None, fingerprint: str,
                   settings: dict | None = None, report: dict | None = None,
                   chat: dict | None = None, index_bundle: dict | None = None,
                   preference: dict | None = None) -> dict[str, Any]:
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
    if preference is not None:
        extra = {"mode": "preference", "preference": preference}
    return {"format": FORMAT, "fingerprint": fingerprint, **extra, "dtype": TOKEN_EXTS[ext].name,
            "sample_ext": ext, "vocab_size": vocab_size, "eos_token_id": eos_token_id,
            "tokenizer": tokenizer, "splits": out_splits, "totals": totals,
            "report": report or {}, "settings": settings or {}, "index_bundle": index_bundle}


def has_masks(manifest: dict[str, Any]) -> bool:
    """Chat and preference shards carry a `.mask` member per sample (a third index column)."""
    return manifest.get("mode") in ("chat", "preference")


def write_index_bundle(root: Path, splits: dict[str, list[ShardRecord]]) -> dict[str, Any]:
    """All shard indexes of every split in one array (manifest order: train, then val), so that
    a reader of a remote corpus starts with one GET instead of one per shard."""
    arrays = [np.load(root / r.index) for name in SPLITS for r in splits.get(name, [])]
    bundle = np.concatenate(arrays) if arrays else np.zeros((0, 2), np.uint64)
    np.save(root / INDEX_BUNDLE, bundle.astype(np.uint64))
    return {"path": INDEX_BUNDLE, "rows": int(len(bundle)), "sha256": file_sha256(root / INDEX_BUNDLE)}


class ManifestError(ValueError):
    """A manifest.json that cannot be used; the message names the file and the fix."""


_SHARD_FIELDS = {"path": str, "index": str, "samples": int, "tokens": int, "bytes": int}


def load_manifest(path: str | Path, text: str | None = None) -> dict[str, Any]:
    """Read and check a manifest (`text`: its contents, already fetched from a remote `path`). It is
    read back, so it is untrusted: any bytes, a directory or a wrong structure give a ManifestError
    naming the file, never a KeyError later."""
    fix = "rerun `python -m data_pipeline.prepare` for this output"
    try:
        m = json.loads(Path(path).read_bytes().decode("utf-8") if text is None else text)
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}; {fix}") from None
    except ValueError as e:  # invalid UTF-8 or JSON
        raise ManifestError(f"manifest {path} is not JSON ({str(e)[:200]}); {fix}") from None
    problem = _structure_problem(m)
    if problem:
        raise ManifestError(f"{path} is not a usable scaletrain manifest: {problem}; {fix}")
    return m


def _structure_problem(m: Any) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        return f"format={found!r}, expected {FORMAT!r}"
    if m.get("sample_ext") not in TOKEN_EXTS or not isinstance(m.get("vocab_size"), int):
        return f"sample_ext={m.get('sample_ext')!r} / vocab_size={m.get('vocab_size')!r} are not valid"
    if not isinstance(m.get("tokenizer"), (dict, type(None))):
        return "tokenizer is not an object"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        return f"splits must hold {', '.join(SPLITS)}"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"splits.{name}.shards is not a list"
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not all(isinstance(s.get(k), t) for k, t in _SHARD_FIELDS.items()):
                return f"splits.{name}.shards[{i}] lacks {', '.join(_SHARD_FIELDS)}"
    return None


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


def _load_npy(path: str | Path) -> np.ndarray:
    """np.load(mmap_mode="r"), once more on CPython 3.11's "AST constructor recursion depth mismatch":
    np.load parses the .npy header with ast.literal_eval, and CPython 3.11's ast raised that once in CI
    (a thread-safety bug of its C state, seen with another thread parsing); transient, the file is fine."""
    try:
        return np.load(path, mmap_mode="r")
    except SystemError:
        return np.load(path, mmap_mode="r")


def load_index(path: Path | np.ndarray, samples: int, tokens: int, size: int,
               columns: int = 2) -> np.ndarray | None:
    """The (n+1, columns) index of a shard (a path, or the array) if it is consistent with the
    manifest entry, else None (columns: 2, or 3 for chat shards, see shard_format.py)."""
    try:
        idx = _load_npy(path) if isinstance(path, (str, Path)) else path
    except (OSError, ValueError):
        return None
    if idx.ndim != 2 or idx.shape != (samples + 1, columns):
        return None
    if int(idx[-1, 0]) != size or int(idx[-1, 1]) != tokens:
        return None
    return idx
