"""Corrupt shards: data.on_error=skip warns, counts and carries on; raise names the shard."""
from __future__ import annotations

import os
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import webdataset as wds

from data_pipeline import build_loader
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.shard_table import DataWarning, ShardError
from tests.support.data import EOS, make_docs, make_shards


def loader(urls, **kw):
    kw.setdefault("num_workers", 0)
    return build_loader(WebDatasetConfig(urls=str(urls), **kw), rank=0, world_size=1,
                        micro_batch_size=2, seq_len=8)


def epoch_docs(ld, tokens):
    c = Counter()
    for p in ld.order.pieces(0, tokens):
        c[p.doc] += p.take
    return c


def truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_shard_skip_and_raise(tmp_path):
    s = make_shards(tmp_path, sizes=(4, 5, 6))
    truncate(s.shard_paths[1], os.path.getsize(s.shard_paths[1]) // 2)
    with pytest.raises(ShardError, match="shard-000001.tar.*truncated"):
        loader(s.root)
    with pytest.warns(DataWarning, match="shard-000001.tar"):
        ld = loader(s.root, on_error="skip")
    assert ld.metrics()["data_skipped_shards"] == 1
    ids = set()
    for b in islice(iter(ld), 30):
        ids |= set(b["input_ids"].flatten().tolist())
    kept = s.docs[:4] + s.docs[9:]
    assert ids - {EOS} == {int(d[0]) for d in kept}


def test_truncated_and_bad_arrays_without_manifest(tmp_path):
    docs = make_docs(5, vocab_size=100)
    good, cut = tmp_path / "good.tar", tmp_path / "cut.tar"
    with wds.TarWriter(str(good)) as w:
        for i, d in enumerate(docs[:3]):
            w.write({"__key__": f"d{i}", "u16": d.astype("<u2").tobytes()})
        w.write({"__key__": "odd", "u16": b"\x01\x00\x02"})  # 3 bytes: not a uint16 array
    with wds.TarWriter(str(cut)) as w:
        for i, d in enumerate(docs[3:]):
            w.write({"__key__": f"d{i}", "u16": d.astype("<u2").tobytes()})
    truncate(cut, 512 + 10)
    urls = f"{cut}::{good}"
    with pytest.raises(ShardError, match="cut.tar is truncated"):
        loader(urls, vocab_size=100)
    with pytest.raises(ShardError, match="good.tar has bad samples: odd.u16"):
        loader(good, vocab_size=100)
    with pytest.warns(DataWarning) as caught:
        ld = loader(urls, vocab_size=100, on_error="skip")
    text = " ".join(str(w.message) for w in caught)
    assert "cut.tar" in text and "odd.u16" in text
    m = ld.metrics()
    assert m["data_skipped_shards"] == 1 and m["data_bad_samples"] == 1
    assert epoch_docs(ld, sum(len(d) for d in docs[:3])) == {g: len(docs[g]) for g in range(3)}


def bad_token(s, shard, doc):
    """Overwrite the first token of `doc` in `shard` with 65535 (>= vocab): a bad array."""
    idx = np.load(str(s.shard_paths[shard]) + ".idx.npy")
    poke(s.shard_paths[shard], int(idx[doc, 0]), b"\xff\xff")


def test_bad_array_is_masked_or_raises(tmp_path):
    s = make_shards(tmp_path, sizes=(3, 3))
    bad_token(s, 1, 0)
    n_batches = s.total_tokens // 16 + 1
    with pytest.raises(Exception, match="shard-000001.tar.*65535 >= vocab_size 1000"):
        list(islice(iter(loader(s.root, shuffle=False)), n_batches))
    ld = loader(s.root, shuffle=False, on_error="skip")
    with pytest.warns(DataWarning, match="shard-000001.tar"):
        batches = list(islice(iter(ld), n_batches))
    # The piece of the document that holds the bad id (up to the batch edge) is masked.
    first_piece = min(len(s.docs[3]), 17 - sum(len(d) for d in s.docs[:3]) % 16)  # span = 2*8+1
    assert ld.metrics()["data_masked_tokens"] == first_piece
    masked = sum(int(((b["labels"] == -100) & (b["input_ids"] == 0)).sum()) for b in batches)
    assert masked >= first_piece - 1
    assert all(b["input_ids"].max() < 1000 and b["labels"].max() < 1000 for b in batches)


def test_verify_checks_sha256_before_reading(tmp_path):
    s = make_shards(tmp_path, sizes=(3, 3))
    idx = np.load(str(s.shard_paths[0]) + ".idx.npy")
    poke(s.shard_paths[0], int(idx[1, 0]), np.array([7], "<u2").tobytes())  # valid id, wrong data
    loader(s.root)  # same size, valid tokens: only verification can tell
    with pytest.raises(ShardError, match="shard-000000.tar fails data.verify"):
        loader(s.root, verify=True)
    with pytest.warns(DataWarning, match="shard-000000.tar"):
        ld = loader(s.root, verify=True, on_error="skip")
    assert ld.metrics()["data_skipped_shards"] == 1


def test_shard_truncated_while_running(tmp_path):
    s = make_shards(tmp_path, sizes=(4, 4))
    ld = loader(s.root, shuffle=False, on_error="skip")
    first = loader(s.root, shuffle=False)
    truncate(s.shard_paths[1], 1024)
    n = s.total_tokens // 16 + 1
    with pytest.raises(Exception, match="shard-000001.tar.*short read"):
        list(islice(iter(first), n))
    with pytest.warns(DataWarning, match="short read"):
        list(islice(iter(ld), n))
    assert ld.metrics()["data_masked_tokens"] > 0


def test_missing_urls_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no .*manifest.json.*data_pipeline.prepare"):
        loader(tmp_path)
