"""Prepare into object storage: `python -m data_pipeline.prepare ... out=s3://bucket/corpus/`.

The output is built in a local temporary directory exactly as for a local `out`, then
uploaded: shards, indexes and tokenizer first, manifest.json last. The manifest is the commit
marker: a reader that finds it finds every shard it names. Rerunning on unchanged sources and
settings compares the fingerprint of the remote manifest and the remote sizes of its shards,
and does nothing when they match.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.shards.manifest import FORMAT, MANIFEST_NAME, SPLITS
from data_pipeline.storage.backends import StorageConfig, join, retrying, store_for

RETRIES, BACKOFF_S = 5, 0.5


def remote_manifest_if_current(out: str, fingerprint: str, cfg: StorageConfig) -> dict | None:
    """The remote manifest when `out` already holds a complete output of this fingerprint."""
    url = join(out, MANIFEST_NAME)
    store = store_for(url, cfg)
    try:
        m = json.loads(retrying(lambda: store.read(url), url, RETRIES, BACKOFF_S))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("fingerprint") != fingerprint:
        return None
    want = {join(out, s[k]): (s["bytes"] if k == "path" else None)
            for sp in SPLITS for s in m["splits"][sp]["shards"] for k in ("path", "index")}
    sizes = retrying(lambda: store.listing(join(out, "")), out, RETRIES, BACKOFF_S)
    if sizes is None:  # no listing (fsspec): one HEAD per object, concurrently
        with ThreadPoolExecutor(16) as ex:
            sizes = dict(zip(want, ex.map(
                lambda u: retrying(lambda: store.size(u), u, RETRIES, BACKOFF_S), want)))
    if any(sizes.get(u) is None or (n is not None and sizes[u] != n) for u, n in want.items()):
        return None
    return m


def upload(local: Path, out: str, cfg: StorageConfig) -> None:
    """Every file under `local` to `out`, manifest.json strictly last."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    store = store_for(out, cfg)

    def put(p: Path) -> None:
        url = join(out, p.relative_to(local).as_posix())
        retrying(lambda: store.put(p, url), url, RETRIES, BACKOFF_S)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, files))
    put(local / MANIFEST_NAME)
