"""`data.mix`: weighted datasets as one stream, the same on every world size, exactly resumable;
and `trainer.epochs` turned into steps from the manifests."""
from __future__ import annotations

import json
import math
import shutil
from itertools import islice

import pytest
import torch

from data_pipeline import build_loader
from data_pipeline.read.config import MixSource, WebDatasetConfig, mix_kind_problems
from data_pipeline.read.mix import Schedule
from data_pipeline.schema import ConfigError
from tests.support.data import EOS, make_shards
from tests.unit.test_data_resume import assert_batches_equal, doc_tokens, roundtrip
from train.config import TrainerConfig
from train.epochs import resolve_max_steps

B_FIRST = 500  # documents of source b have ids from here: a row tells its source by its tokens


@pytest.fixture
def ab(tmp_path):
    a = make_shards(tmp_path, name="a", sizes=(7, 3, 12))
    b = make_shards(tmp_path, name="b", sizes=(5, 9), first_id=B_FIRST, seed=1)
    return a, b


def mix_cfg(a, b, wa=0.7, wb=0.3, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 4)
    return WebDatasetConfig(mix=[MixSource(urls=str(a.root), weight=wa),
                                 MixSource(urls=str(b.root), weight=wb, name="bee")], **kw)


def load(cfg, *, rank=0, world=1, b=2, t=8):
    return build_loader(cfg, rank=rank, world_size=world, micro_batch_size=b, seq_len=t)


def source_of(row: torch.Tensor) -> str:
    top = int(row.max())
    assert top != EOS  # documents are >= 3 tokens: every 8-token row holds a non-EOS token
    return "bee" if top > B_FIRST else "a"


def test_shares_follow_the_weights_over_200_steps_and_the_metrics_count_them(ab):
    a, b = ab
    ld = load(mix_cfg(*ab), b=2, t=8)
    accum = 4
    counted = {"a": 0, "bee": 0}
    for batch in islice(iter(ld), 200 * accum):
        for row in batch["input_ids"]:
            counted[source_of(row)] += row.numel()
    total = sum(counted.values())
    assert abs(counted["a"] / total - 0.7) < 0.02 and abs(counted["bee"] / total - 0.3) < 0.02
    m = ld.metrics()
    assert m["data/tokens/a"] == counted["a"] and m["data/tokens/bee"] == counted["bee"]
    assert m["data/epoch/a"] == pytest.approx(counted["a"] / a.total_tokens)
    assert m["data/epoch/bee"] == pytest.approx(counted["bee"] / b.total_tokens)
    assert m["data/epoch/a"] > 1 and m["data/epoch/bee"] > 1  # both sources wrapped into epoch 2+


def test_one_source_mix_is_exactly_the_dataset_alone(ab):
    a, _ = ab
    alone = load(WebDatasetConfig(urls=str(a.root), num_workers=0, shuffle_buffer=4), b=3, t=8)
    mixed = load(WebDatasetConfig(mix=[MixSource(urls=str(a.root))], num_workers=0, shuffle_buffer=4), b=3, t=8)
    assert_batches_equal(list(islice(iter(mixed), 40)), list(islice(iter(alone), 40)))  # ~2.4 epochs


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_what_one_rank_reads(ab, workers):
    one = list(islice(iter(load(mix_cfg(*ab), b=2)), 24))
    ranks = [list(islice(iter(load(mix_cfg(*ab, num_workers=workers), rank=r, world=2, b=2)), 12))
             for r in range(2)]
    interleaved = [ranks[r][k] for k in range(12) for r in range(2)]  # global micro-batch k*W + r
    assert_batches_equal(interleaved, one)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_and_elastic(ab, workers):
    ref = list(islice(iter(load(mix_cfg(*ab), b=2)), 40))
    ranks = [load(mix_cfg(*ab, num_workers=workers), rank=r, world=2, b=2) for r in range(2)]
    its = [iter(ld) for ld in ranks]
    for _ in range(7):
        for it in its:
            next(it)
    states = [roundtrip(ld.state_dict()) for ld in ranks]
    same = load(mix_cfg(*ab, num_workers=workers), rank=1, world=2, b=2)
    same.load_state_dict(states[1])
    assert_batches_equal(list(islice(iter(same), 5)), ref[14 + 1:14 + 10:2])
    one = load(mix_cfg(*ab), b=2)
    one.load_elastic(states)
    assert one.metrics() == ranks[0].metrics()  # global counts survive the resume
    assert_batches_equal(list(islice(iter(one), 20)), ref[14:34])
    with pytest.raises(ValueError, match="load_elastic"):
        load(mix_cfg(*ab)).load_state_dict(states[0])
    with pytest.raises(ValueError, match="same sources"):
        load(mix_cfg(*ab[::-1])).load_elastic(states)


def test_schedule_is_smooth_and_exact():
    s = Schedule([0.7, 0.3], ["a", "b"])
    assert s.period == 10 and "".join("ab"[s.source(i)] for i in range(10)).count("b") == 3
    for n in range(1, 200):  # every prefix is within one row of its share
        assert all(abs(s.before(n) - [0.7 * n, 0.3 * n]) < 1)
    with pytest.raises(ConfigError, match="under 1/1000"):
        Schedule([1.0, 1e-5], ["big", "tiny"])


def test_mix_config_errors_name_the_keys(ab, tmp_path):
    a, b = ab
    both = WebDatasetConfig(urls=str(a.root), mix=[MixSource(urls=str(b.root))])
    assert any("data.urls=" in p and "data.mix are both set" in p for p in both.validate())
    bad = WebDatasetConfig(mix=[MixSource(urls=str(a.root), weight=0), MixSource(urls=str(a.root))])
    problems = " | ".join(bad.validate())
    assert "data.mix[0].weight=0" in problems and "share the name(s) ['a']" in problems
    other_vocab = make_shards(tmp_path, name="c", sizes=(4,), vocab_size=2000)
    with pytest.raises(ConfigError, match="different vocab_size"):
        load(mix_cfg(a, other_vocab))
    chat = tmp_path / "chatlike"
    shutil.copytree(b.root, chat)
    m = json.loads((chat / "manifest.json").read_text())
    (chat / "manifest.json").write_text(json.dumps({**m, "mode": "chat", "chat": {"max_len": 8}}))
    problems = mix_kind_problems(WebDatasetConfig(mix=[MixSource(urls=str(a.root)), MixSource(urls=str(chat))]))
    assert any("mixes text shards (a) with chat shards (chatlike)" in p for p in problems), problems


def test_epochs_become_steps_that_see_every_document_twice(tmp_path, caplog):
    s = make_shards(tmp_path, sizes=(6, 2, 8), min_len=8, max_len=8)  # 128 tokens: 2 epochs = 8 steps
    ld = build_loader(WebDatasetConfig(urls=str(s.root), num_workers=0, shuffle_buffer=4),
                      rank=0, world_size=1, micro_batch_size=1, seq_len=16)
    t = TrainerConfig(epochs=2.0, micro_batch_size=1, seq_len=16, grad_accum_steps=2)
    with caplog.at_level("INFO", logger="scaletrain"):
        steps = resolve_max_steps(t, ld, world_size=1, accum=2)
    assert steps == 8
    assert "trainer.epochs=2: 8 steps = 2 x 128 tokens / (2 x 16)" in caplog.text
    seen = doc_tokens(islice(iter(ld), steps * 2))
    once = doc_tokens([{"input_ids": torch.from_numpy(d)} for d in s.docs])
    assert len(once) == 16 and seen == {d: 2 * n for d, n in once.items()}  # every document, twice
    t.epochs = 2.1  # rounded up: every document at least 2.1 times
    assert resolve_max_steps(t, ld, world_size=1, accum=2) == math.ceil(2.1 * 128 / 32) == 9


def test_epochs_of_a_mix_sum_the_sources_epochs(ab):
    a, b = ab
    units, unit, counted = load(mix_cfg(a, b), b=1, t=8).epoch_units(1.0)
    assert unit == "rows" and units == math.ceil(a.total_tokens / 8 + b.total_tokens / 8)
    assert f"a: 1 x {a.total_tokens:,} tokens / 8" in counted and f"bee: 1 x {b.total_tokens:,}" in counted


def test_mix_bench_smoke():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("chat_loader_bench", REPO / "bench" / "chat_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.mix_bench(30, 2, 640, 0.05)
    assert set(r) == {"text", "chat"} and all(v["mix3_batches_per_s"] > 0 for v in r.values())


def _chat_shards(root, lo, n, seed):
    """Chat shards (tokens + masks, pad id 0) whose token ids lie in [lo, lo + 50)."""
    import numpy as np

    from data_pipeline.shards.format import ShardWriter
    from data_pipeline.shards.manifest import MANIFEST_NAME, build_manifest, write_json_atomic

    rng = np.random.default_rng(seed)
    w = ShardWriter(root, "train", "u16", 1 << 30)
    for _ in range(n):
        k = int(rng.integers(3, 12))
        w.write(rng.integers(lo, lo + 50, k).astype(np.uint16), np.ones(k, np.uint8))
    chat = {"max_len": 16, "mask_ext": "mask", "pad_token_id": 0, "train_on": "assistant", "on_long": "skip"}
    write_json_atomic(root / MANIFEST_NAME, build_manifest(splits={"train": w.close()}, ext="u16", vocab_size=512,
                                                           eos_token_id=0, tokenizer=None, fingerprint="t", chat=chat))
    return root


def test_chat_mix_counts_real_tokens_per_source(tmp_path):
    a, b = _chat_shards(tmp_path / "ca", 100, 30, 0), _chat_shards(tmp_path / "cb", 300, 20, 1)
    cfg = WebDatasetConfig(mix=[MixSource(urls=str(a), weight=0.7), MixSource(urls=str(b), weight=0.3)],
                           num_workers=0)
    ld = load(cfg, b=2, t=16)
    counted = {"ca": 0, "cb": 0}
    for batch in islice(iter(ld), 40):
        ids = batch["input_ids"]
        counted["ca"] += int(((ids >= 100) & (ids < 150)).sum())
        counted["cb"] += int(((ids >= 300) & (ids < 350)).sum())
    m = ld.metrics()
    assert m["data/tokens/ca"] == counted["ca"] and m["data/tokens/cb"] == counted["cb"]
    assert m["data/epoch/ca"] > 1 and m["data_rows"] == 80
