"""The shard table of a remote corpus, built from manifest.json and the indexes only.

`data.urls` may be a remote prepare output root (`s3://bucket/corpus/`, `https://host/corpus`,
its manifest.json), or remote shard URLs (brace patterns, `a::b` lists) with the manifest in
their folder or its parent. Start-up costs one GET of the manifest and one of the index
bundle prepare writes (`indexes.npy`); older outputs without a bundle have their per-shard
indexes fetched concurrently. No shard body is read here: the loader fetches bodies lazily
(prefetch.py), and checks their size and sha256 against the manifest as they arrive.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.prefetch import cache_limit_problem
from data_pipeline.read.table import ShardTable, assemble, table_vocab
from data_pipeline.schema import ConfigError
from data_pipeline.shards.format import TOKEN_EXTS
from data_pipeline.shards.manifest import MANIFEST_NAME, SPLITS, ManifestError, has_masks, load_index, load_manifest
from data_pipeline.storage.backends import StorageConfig, is_remote, join, probe, retrying, store_for
from data_pipeline.storage.cache import cache_dir_problem, cache_key, default_cache_dir


def _get(url: str, cfg: WebDatasetConfig) -> bytes:
    store = store_for(url, cfg.storage)
    return retrying(lambda: store.read(url), url, cfg.retries, cfg.retry_backoff_s)


def _is_root(url: str) -> bool:
    last = url.rstrip("/").rsplit("/", 1)[-1]
    return "{" not in url and "::" not in url and not last.endswith((".tar", ".json"))


def manifest_url(cfg: WebDatasetConfig, urls: str) -> str:
    """Where the manifest of `urls` is (the first candidate that exists)."""
    if cfg.manifest:
        return cfg.manifest
    if _is_root(urls):
        return join(urls, MANIFEST_NAME)
    if urls.endswith(".json"):
        return urls
    first = wds.shardlists.expand_urls(urls)[0]
    parent = first.rsplit("/", 1)[0]
    candidates = [join(parent, MANIFEST_NAME), join(parent.rsplit("/", 1)[0], MANIFEST_NAME)]
    for c in candidates:
        if store_for(c, cfg.storage).size(c) is not None:
            return c
    raise ValueError(f"data.urls={urls!r}: no {MANIFEST_NAME} at {' or '.join(candidates)}; remote "
                     "shards need the manifest prepare wrote (set data.manifest=URL if it is elsewhere)")


def unreachable(cfg: WebDatasetConfig) -> list[str]:
    """Start-up check of remote data.urls: one HEAD of the manifest, retried, with the timeout."""
    if not is_remote(cfg.urls):
        return []
    target = cfg.manifest or (join(cfg.urls, MANIFEST_NAME) if _is_root(cfg.urls)
                              else wds.shardlists.expand_urls(cfg.urls)[0])
    problem = probe(target, cfg.storage, cfg.retries, cfg.retry_backoff_s)
    if problem is None:
        return []
    return [f"data.urls={cfg.urls!r}: {problem}; check the URL, data.storage.endpoint_url "
            "(or AWS_ENDPOINT_URL) and that the server is up"]


def _indexes(entries: list[dict], root: str, manifest: dict, cfg: WebDatasetConfig) -> list[np.ndarray]:
    bundle = manifest.get("index_bundle")
    if bundle:
        arr = np.load(io.BytesIO(_get(join(root, bundle["path"]), cfg)), allow_pickle=False)
        starts = {}
        row = 0
        for name in SPLITS:
            for s in manifest["splits"][name]["shards"]:
                starts[s["path"]] = row
                row += s["samples"] + 1
        if row == len(arr):
            return [arr[starts[e["path"]]:starts[e["path"]] + e["samples"] + 1] for e in entries]
    with ThreadPoolExecutor(16) as ex:
        blobs = ex.map(lambda e: _get(join(root, e["index"]), cfg), entries)
        return [np.load(io.BytesIO(b), allow_pickle=False) for b in blobs]


def _tokenizer(manifest: dict, root: str, cfg: WebDatasetConfig) -> str | None:
    """Copy the corpus tokenizer into the cache (export needs it as a local directory)."""
    tok = manifest.get("tokenizer") or {}
    if not tok.get("dir") or not tok.get("files"):
        return None
    dest = Path(cfg.cache_dir or default_cache_dir()) / ("tokenizer-" + cache_key(join(root, tok["dir"])))
    if not (dest / tok["files"][-1]).is_file():
        tmp = dest.with_name(dest.name + f".tmp-{id(dest)}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name in tok["files"]:
            (tmp / name).write_bytes(_get(join(root, f"{tok['dir']}/{name}"), cfg))
        try:
            tmp.rename(dest)
        except OSError:  # another rank of this node renamed its copy first
            pass
    return str(dest)


def remote_table(cfg: WebDatasetConfig, split: str) -> ShardTable:
    """The ShardTable of a remote corpus (see module docstring)."""
    urls = cfg.val_urls if split == "val" and cfg.val_urls else cfg.urls
    murl = manifest_url(cfg, urls)
    root = murl.rsplit("/", 1)[0]
    try:
        text = _get(murl, cfg).decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {murl} is not UTF-8 text (binary or corrupt); point data.urls at a "
                            "prepare output, or rerun `python -m data_pipeline.prepare` for it") from None
    manifest = load_manifest(murl, text)
    by_url = {join(root, s["path"]): s for sp in SPLITS for s in manifest["splits"][sp]["shards"]}
    if _is_root(urls) or urls.endswith(".json") or (split == "val" and not cfg.val_urls):
        shard_urls = [join(root, s["path"]) for s in manifest["splits"][split]["shards"]]
    else:
        shard_urls = wds.shardlists.expand_urls(urls)
    key = "data.val_urls" if split == "val" and cfg.val_urls else "data.urls"
    missing = [u for u in shard_urls if u not in by_url]
    if missing:
        raise ConfigError([f"{key}={urls!r}: {missing[0]} is not listed in {murl} "
                           f"({len(missing)} of {len(shard_urls)} shards are not)"])
    if not shard_urls:
        fix = ("set data.val_urls to validation shards, prepare with split.val_fraction > 0, or set "
               "trainer.eval_every=0") if split == "val" else "point data.urls at a prepare output with training shards"
        raise ConfigError([f"{key}={urls!r}: {murl} lists no {split} shards: {fix}"])
    entries = [by_url[u] for u in shard_urls]
    itemsize = TOKEN_EXTS[manifest["sample_ext"]].itemsize
    idxs = []
    columns = 3 if has_masks(manifest) else 2   # chat: + mask offsets (shard_format.py)
    for u, e, idx in zip(shard_urls, entries, _indexes(entries, root, manifest, cfg)):
        if load_index(idx, e["samples"], e["tokens"], e["bytes"], columns) is None:
            raise ValueError(f"the index of {u} does not match {murl}: rerun prepare (force=true)")
        idxs.append(np.asarray(idx, dtype=np.int64))
    problems = [p for p in (cache_limit_problem(cfg, max(e["bytes"] for e in entries)),
                            cache_dir_problem(cfg.cache_dir or default_cache_dir())) if p]
    if problems:
        raise ConfigError([f"{p} (data.urls={urls!r})" for p in problems])
    vocab, eos, _ = table_vocab(cfg, manifest, None)
    table = assemble(shard_urls, shard_urls, idxs, [itemsize] * len(idxs), vocab, eos,
                      _tokenizer(manifest, root, cfg), [], 0)
    if table.mask_offsets is not None:
        table.chat = dict(manifest.get("chat") or manifest.get("preference") or {})
        table.pairs = manifest.get("mode") == "preference"
    table.remote = True
    table.sizes = np.array([e["bytes"] for e in entries], dtype=np.int64)
    table.sha256 = [e["sha256"] for e in entries]
    return table


__all__ = ["StorageConfig", "manifest_url", "remote_table", "unreachable"]
