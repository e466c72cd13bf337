"""Remote corpora in-process: start-up reads only the manifest and indexes, batches equal the
local ones, errors name the URL and status, bad copies follow data.on_error, the cache never
evicts a pinned shard. Real servers on 127.0.0.1 (a threading HTTP server, moto for S3)."""
from __future__ import annotations

import itertools
import json
import shutil
import time

import numpy as np
import pytest

from data_pipeline.prepare.publish import upload
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import WebDatasetLoader
from data_pipeline.shards.format import ShardFormatError
from data_pipeline.storage.backends import FetchError
from data_pipeline.storage.cache import ShardCache
from tests.support.http_server import ShardServer

pytestmark = pytest.mark.timeout(120)


def loader(urls: str, tmp_path, **kw) -> WebDatasetLoader:
    cfg = WebDatasetConfig(urls=urls, num_workers=0, shuffle_buffer=8, cache_dir=str(tmp_path / "cache"),
                           retry_backoff_s=0.01, **kw)
    return WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=2, seq_len=32)


def batches(ld: WebDatasetLoader, n: int = 6) -> list[np.ndarray]:
    return [b["input_ids"].numpy().copy() for b in itertools.islice(ld, n)]


def plan_shards(ld: WebDatasetLoader, rounds: int) -> list[str]:
    """Distinct shards of the first `rounds` micro-batches, in order of first use (the plan)."""
    span = ld.micro_batch_size * ld.seq_len
    shards = [p.shard for k in range(rounds) for p in ld.order.pieces(k * span, span + 1)]
    return ["train/" + ld.table.names[s].rsplit("/", 1)[-1] for s in dict.fromkeys(shards)]


def test_start_up_reads_only_manifest_and_index_bundle_then_streams_the_local_batches(remote_corpus, tmp_path):
    shards, server = remote_corpus
    server.clear()
    ld = loader(server.url + "/", tmp_path, prefetch_shards=2)
    assert [(r.method, r.path) for r in server.log] == [("GET", "manifest.json"), ("GET", "indexes.npy")]
    got = batches(ld)
    ref = batches(loader(str(shards.root), tmp_path))
    assert all((a == b).all() for a, b in zip(got, ref)) and len(got) == 6
    fetched = server.fetched()
    assert len(fetched) == len(set(fetched)), fetched           # once each
    plan = plan_shards(ld, 7)
    assert set(plan_shards(ld, 6)) <= set(fetched) <= set(plan_shards(ld, 40)[:len(plan) + 2])
    assert len(fetched) < len(shards.shard_paths) // 2


def test_without_an_index_bundle_the_per_shard_indexes_are_read(remote_corpus, tmp_path):
    shards, _ = remote_corpus
    root = tmp_path / "old"
    shutil.copytree(shards.root, root)
    m = json.loads((root / "manifest.json").read_text())
    m["index_bundle"] = None
    (root / "manifest.json").write_text(json.dumps(m))
    (root / "indexes.npy").unlink()
    with ShardServer(root) as server:
        ld = loader(server.url + "/train/shard-{000000..000043}.tar", tmp_path)
        gets = [r.path for r in server.log if r.method == "GET"]
        assert sum(p.endswith(".idx.npy") for p in gets) == 44 and not any(p.endswith(".tar") for p in gets)
        assert all((a == b).all() for a, b in zip(batches(ld), batches(loader(str(shards.root), tmp_path))))


def test_an_error_after_the_last_retry_names_the_url_and_the_status(remote_corpus, tmp_path):
    shards, _ = remote_corpus
    with ShardServer(shards.root, fail_every=1) as server:
        t0 = time.monotonic()
        with pytest.raises(FetchError, match=r"/manifest\.json: HTTP 503 .*after 3 tries"):
            loader(server.url + "/", tmp_path, retries=2)
        assert time.monotonic() - t0 < 10
        assert len(server.log) == 3


def test_a_bad_copy_is_fetched_twice_then_handled_by_on_error(remote_corpus, tmp_path):
    shards, _ = remote_corpus
    root = tmp_path / "bad"
    shutil.copytree(shards.root, root)
    ld = loader(str(root), tmp_path)
    first = plan_shards(ld, 1)[0]
    data = bytearray((root / first).read_bytes())
    data[520] ^= 0xFF   # a byte of the first document's tokens (its data starts after a 512-byte header)
    (root / first).write_bytes(bytes(data))
    with ShardServer(root) as server:
        with pytest.raises(ShardFormatError, match=rf"{first}.*sha256.*twice"):
            batches(loader(server.url + "/", tmp_path / "a"), 1)
        assert server.fetched().count(first) == 2
        skipping = loader(server.url + "/", tmp_path / "b", on_error="skip")
        assert len(batches(skipping, 3)) == 3 and skipping.metrics()["data_masked_tokens"] > 0


def test_a_cache_limit_below_the_prefetch_window_names_both_numbers(remote_corpus, tmp_path):
    _, server = remote_corpus
    with pytest.raises(ValueError, match=r"cache_limit='15KB' \(15,000 bytes\).*prefetch_shards=4.*40,960 bytes"):
        loader(server.url + "/", tmp_path, cache_limit="15KB", prefetch_shards=4)


def test_remote_settings_are_validated_with_the_other_problems():
    problems = WebDatasetConfig(urls="nosuch://bucket/corpus/", cache_limit="lots", prefetch_shards=0).validate()
    text = "\n".join(problems)
    assert "unknown scheme nosuch://" in text and "data.cache_limit" in text and "prefetch_shards=0" in text


def test_the_cache_evicts_least_recently_used_unpinned_shards_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in "abcd":
        (src / name).write_bytes(name.encode() * 1000)

    def fetch(url, f):
        f.write((src / url).read_bytes())
        return ""

    cache = ShardCache(str(tmp_path / "cache"), limit=2500)
    for name in "abc":
        cache.pin(name)
        cache.ensure(name, 1000, None, fetch)
        if name == "b":
            cache.unpin("a")        # a consumed; b stays pinned
        time.sleep(0.01)
    assert not cache.path("a").exists() and cache.path("b").exists() and cache.path("c").exists()
    assert cache.used_bytes() <= 2500
    with pytest.warns(RuntimeWarning, match="going over the limit"):   # b and c pinned: no room
        cache.pin("d")
        cache.ensure("d", 1000, None, fetch)
    assert cache.path("b").exists() and cache.path("c").exists()
    cache.close()


def test_s3_through_moto_streams_the_local_batches(remote_corpus, moto_s3, tmp_path):
    import boto3

    shards, _ = remote_corpus
    boto3.client("s3").create_bucket(Bucket="inproc")
    upload(shards.root, "s3://inproc/corpus/", WebDatasetConfig().storage)
    ld = loader("s3://inproc/corpus/", tmp_path)
    assert all((a == b).all() for a, b in zip(batches(ld), batches(loader(str(shards.root), tmp_path))))
    with pytest.raises(ValueError, match="no manifest.json at s3://inproc/nothing/train/manifest.json"):
        loader("s3://inproc/nothing/train/shard-{000000..000003}.tar", tmp_path)


def test_the_validation_split_of_a_remote_shard_list_comes_from_its_manifest(remote_corpus, tmp_path):
    shards, server = remote_corpus

    def val(urls):
        cfg = WebDatasetConfig(urls=urls, num_workers=0, cache_dir=str(tmp_path / "cache"))
        return WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=1, seq_len=8, split="val")

    ref = batches(val(str(shards.root)), 2)
    for urls in (server.url + "/", server.url + "/train/shard-{000000..000043}.tar"):
        ld = val(urls)
        assert [n.rsplit("/", 2)[-2] for n in ld.table.names] == ["val"]
        assert all((a == b).all() for a, b in zip(batches(ld, 2), ref))


def test_chat_shards_stream_over_http_like_local_ones(llama3_tokenizer, tmp_path):
    from tests.support.data import prepare_chat, sample_conversations, write_jsonl

    src = write_jsonl(tmp_path / "chats.jsonl", sample_conversations(60, seed=5, max_words=6))
    out = tmp_path / "chat"
    manifest = prepare_chat(out, src, llama3_tokenizer, **{"chat.max_len": 64, "shard.max_bytes": 4096})
    assert manifest["index_bundle"]["rows"] > 0 and len(manifest["splits"]["train"]["shards"]) >= 4

    def rows(urls):
        cfg = WebDatasetConfig(urls=urls, num_workers=0, shuffle_buffer=8, cache_dir=str(tmp_path / "cache"),
                               prefetch_shards=2)
        return WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=2, seq_len=64)

    ref = [b["labels"].numpy().copy() for b in itertools.islice(rows(str(out)), 6)]
    with ShardServer(out) as server:
        ld = rows(server.url + "/")
        assert ld.unit == "rows" and ld.tokenizer_dir is not None
        got = [b["labels"].numpy().copy() for b in itertools.islice(ld, 6)]
        fetched = server.fetched()
        assert fetched and len(fetched) == len(set(fetched))   # lazily, once each
    assert all((a == b).all() for a, b in zip(got, ref)) and len(got) == 6
