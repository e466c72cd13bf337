"""Resolve `data.urls` into a checked table of shards and their documents.

Every rank builds the same table from the same files (manifest indexes, or tar headers), so
the plan derived from it (`order.py`) is identical everywhere without any communication.
Unusable shards are dropped here, before any batch is planned (`data.on_error=skip`), or
stop the run with an error naming them (`raise`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.fsutil import file_sha256
from data_pipeline.read.config import WebDatasetConfig, missing_local
from data_pipeline.read.remote_table import remote_table
from data_pipeline.read.table import DataWarning, ShardError, ShardTable, assemble, table_vocab
from data_pipeline.shards.format import (
    TOKEN_EXTS,
    ShardFormatError,
    scan_tar,
)
from data_pipeline.shards.manifest import MANIFEST_NAME, has_masks, load_index, load_manifest
from data_pipeline.storage.backends import is_remote
from data_pipeline.storage.cache import default_cache_dir


def _local(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if ":" in url.split("/", 1)[0] else url


def _find_manifest(cfg: WebDatasetConfig, first_local: str | None) -> Path | None:
    if cfg.manifest:
        p = Path(cfg.manifest)
        if not p.is_file():
            raise ValueError(f"data.manifest={cfg.manifest!r} does not exist; point it at the "
                             "manifest.json written by prepare or leave it empty")
        return p
    if first_local:
        for d in (Path(first_local).parent, Path(first_local).parent.parent):
            if (d / MANIFEST_NAME).is_file():
                return d / MANIFEST_NAME
    return None


def resolve_urls(cfg: WebDatasetConfig, split: str) -> tuple[list[str], Path | None]:
    """Shard URLs for `split` and the manifest describing them (None = scan the tars)."""
    urls = cfg.val_urls if split == "val" and cfg.val_urls else cfg.urls
    key = "data.val_urls" if split == "val" and cfg.val_urls else "data.urls"
    missing = missing_local(urls, key)
    if missing:
        raise ValueError(missing[0])
    loc = _local(urls) if "::" not in urls else None
    if loc and ("{" not in loc) and (Path(loc).is_dir() or loc.endswith(".json")):
        mpath = Path(loc) / MANIFEST_NAME if Path(loc).is_dir() else Path(loc)
        if not mpath.is_file():
            raise ValueError(f"{key}={urls!r}: no {mpath}; run `python -m data_pipeline.prepare "
                             f"out={loc}` or list the shards (e.g. {loc}/shard-{{000000..000009}}.tar)")
        m = load_manifest(mpath)
        return [str(mpath.parent / s["path"]) for s in m["splits"][split]["shards"]], mpath
    expanded = wds.shardlists.expand_urls(urls)
    mpath = _find_manifest(cfg, _local(expanded[0]) if expanded else None)
    if split == "val" and not cfg.val_urls:
        if mpath is None:
            raise ValueError(f"split=val: data.urls={urls!r} has no manifest.json next to it; "
                             "set data.val_urls to the validation shards")
        m = load_manifest(mpath)
        return [str(mpath.parent / s["path"]) for s in m["splits"]["val"]["shards"]], mpath
    return expanded, mpath


def _copy_pipe(url: str, cache_dir: str) -> str:
    """Run a pipe: URL once into the local cache for random access (remote schemes stream
    lazily instead: remote_table.py). Concurrent ranks each write a private temp file and
    rename it."""
    root = Path(cache_dir or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    dest = root / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".tar")
    if not dest.is_file():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, dest)
    return str(dest)


def _check_shard(url: str, path: str, entry: dict | None, root: Path | None,
                 cfg: WebDatasetConfig) -> tuple[np.ndarray, int, list[str]]:
    """(index array, itemsize, bad-sample notes) for one shard; raises ShardFormatError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ShardFormatError(f"shard {url} is unreadable: {e}") from e
    if entry is not None:
        if size != entry["bytes"]:
            raise ShardFormatError(f"shard {url} has {size} bytes but the manifest says "
                                   f"{entry['bytes']} (truncated or rewritten)")
        if cfg.verify and file_sha256(path) != entry["sha256"]:
            raise ShardFormatError(f"shard {url} fails data.verify: sha256 differs from the manifest")
        idx = load_index(root / entry["index"], entry["samples"], entry["tokens"], size,
                         3 if entry["_chat"] else 2)
        if idx is not None:
            return idx, entry["_itemsize"], []
    elif cfg.verify:
        warnings.warn(f"data.verify: shard {url} is not listed in a manifest; not verified",
                      DataWarning, stacklevel=3)
    scan = scan_tar(path)
    return scan.index_array(size), TOKEN_EXTS[scan.ext].itemsize, scan.bad_samples


def build_table(cfg: WebDatasetConfig, split: str) -> ShardTable:
    """Resolve, check and index the shards of `split`; see the module docstring."""
    if is_remote(cfg.val_urls if split == "val" and cfg.val_urls else cfg.urls):
        return remote_table(cfg, split)
    urls, mpath = resolve_urls(cfg, split)
    manifest = load_manifest(mpath) if mpath else None
    entries: dict[str, dict] = {}
    if manifest:
        isz = TOKEN_EXTS[manifest["sample_ext"]].itemsize
        for sp in manifest["splits"].values():
            for s in sp["shards"]:
                entries[os.path.realpath(mpath.parent / s["path"])] = {
                    **s, "_itemsize": isz, "_chat": has_masks(manifest)}
    if not urls:
        raise ValueError(f"no {split} shards in data.urls={cfg.urls!r}"
                         + (f" (manifest {mpath} lists none)" if mpath else ""))
    paths, names, idxs, sizes, skipped, bad = [], [], [], [], [], 0
    for url in urls:
        if url.startswith("pipe:") and not cfg.allow_pipe:
            raise ValueError(f"data.urls has the pipe: URL {url!r}; set data.allow_pipe=true to run it")
        try:
            path = _local(url) or _copy_pipe(url, cfg.cache_dir)
            entry = entries.get(os.path.realpath(path))
            idx, itemsize, bad_notes = _check_shard(url, path, entry, mpath.parent if mpath else None, cfg)
        except (ShardFormatError, OSError) as e:
            if cfg.on_error == "raise":
                raise ShardError(f"{e} (set data.on_error=skip to skip bad shards)") from e
            warnings.warn(f"skipping shard: {e}", DataWarning, stacklevel=2)
            skipped.append(url)
            continue
        if bad_notes:
            if cfg.on_error == "raise":
                raise ShardError(f"shard {url} has bad samples: {'; '.join(bad_notes[:3])} "
                                 "(set data.on_error=skip to skip them)")
            warnings.warn(f"shard {url}: skipping {len(bad_notes)} bad samples: "
                          f"{'; '.join(bad_notes[:3])}", DataWarning, stacklevel=2)
            bad += len(bad_notes)
        paths.append(path)
        names.append(url)
        idxs.append(np.asarray(idx, dtype=np.int64))
        sizes.append(itemsize)
    if not paths:
        raise ValueError(f"no readable {split} shards in data.urls={cfg.urls!r}: skipped {skipped}")
    vocab, eos, tok_dir = table_vocab(cfg, manifest, mpath)
    table = assemble(paths, names, idxs, sizes, vocab, eos, tok_dir, skipped, bad)
    if table.mask_offsets is not None:
        table.chat = dict(manifest.get("chat") or {}) if manifest else {}
        if manifest and manifest.get("mode") == "preference":
            table.chat, table.pairs = dict(manifest["preference"]), True
    return table



__all__ = ["DataWarning", "ShardError", "ShardTable", "build_table", "resolve_urls"]
