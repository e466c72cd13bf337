"""`data.mix` with a remote source: its shards stream through the per-source prefetch window and
the batches equal those of the same mix read from local files."""
from __future__ import annotations

from itertools import islice

import pytest

from data_pipeline import build_loader
from data_pipeline.read.config import MixSource, WebDatasetConfig
from tests.support.data import make_shards
from tests.unit.test_data_resume import assert_batches_equal

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("workers", [0, 2])
def test_remote_source_in_a_mix_gives_the_local_batches(remote_corpus, tmp_path, workers):
    shards, server = remote_corpus
    local = make_shards(tmp_path, sizes=(5, 9), vocab_size=256, content="random", seed=4)

    def mix(remote_urls: str) -> list:
        cfg = WebDatasetConfig(mix=[MixSource(urls=remote_urls, weight=0.6, name="r"),
                                    MixSource(urls=str(local.root), weight=0.4, name="l")],
                               num_workers=workers, shuffle_buffer=8, cache_dir=str(tmp_path / "cache"),
                               prefetch_shards=2, retry_backoff_s=0.01)
        return list(islice(iter(build_loader(cfg, rank=0, world_size=1, micro_batch_size=2, seq_len=32)), 12))

    server.clear()
    got = mix(server.url + "/")
    assert_batches_equal(got, mix(str(shards.root)))
    fetched = server.fetched()
    assert fetched and len(fetched) == len(set(fetched)) < len(shards.shard_paths) // 2  # once each, lazily
