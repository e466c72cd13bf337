"""`python -m data_pipeline.prepare`: every source kind, bad input, manifest, no-op rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.fsutil import file_sha256
from data_pipeline.prepare import PrepareError, prepare
from data_pipeline.prepare.config import PrepareConfigError, load_prepare_config
from data_pipeline.prepare.encode import is_val
from data_pipeline.shards.manifest import load_manifest
from tests.helpers import REPO


def run(out, **kw):
    kw.setdefault("num_proc", 1)
    kw.setdefault("progress", False)
    return prepare(load_prepare_config({"out": str(out), **kw}))


def read_docs(out, split="train"):
    """Token arrays of a split, in shard order, read with plain webdataset."""
    m = load_manifest(Path(out) / "manifest.json")
    urls = [str(Path(out) / s["path"]) for s in m["splits"][split]["shards"]]
    ext = m["sample_ext"]
    return [np.frombuffer(x[ext], "<u2" if ext == "u16" else "<u4")
            for x in wds.WebDataset(urls, shardshuffle=False)] if urls else []


def texts(out, tok, split="train"):
    return [tok.decode(d[:-1].tolist()) for d in read_docs(out, split)]


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """The demo corpus, small: 24 stdlib files, a 400-token BPE trained on them."""
    out = tmp_path_factory.mktemp("prep") / "stdlib"
    m = run(out, source={"path": "stdlib", "max_files": 24}, tokenizer={"vocab_size": 400},
            shard={"max_bytes": 40_000}, split={"val_fraction": 0.2})
    from transformers import AutoTokenizer

    return out, m, AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)


def test_stdlib_demo_roundtrip_and_manifest(stdlib):
    out, m, tok = stdlib
    assert tok.eos_token_id == m["eos_token_id"] and len(tok) == m["vocab_size"] <= 400
    assert m["dtype"] == "uint16" and m["report"]["documents_read"] == 24
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and m["splits"]["val"]["samples"] > 0
    for s in shards + m["splits"]["val"]["shards"]:
        assert (out / s["path"]).stat().st_size == s["bytes"]
        assert file_sha256(out / s["path"]) == s["sha256"]
    assert sum(s["tokens"] for s in shards) == m["splits"]["train"]["tokens"]
    docs = read_docs(out)
    assert all(d[-1] == tok.eos_token_id for d in docs)
    assert sum(len(d) for d in docs) == m["splits"]["train"]["tokens"]
    from data_pipeline.prepare.config import SourceConfig
    from data_pipeline.prepare.sources import resolve_source

    files = resolve_source(SourceConfig(max_files=24)).files
    originals = {Path(f).read_text(encoding="utf-8") for f in files}
    train, val = texts(out, tok), texts(out, tok, "val")
    assert set(train) | set(val) <= originals
    assert len(train) + len(val) + m["report"]["skipped"]["empty"] == 24
    assert all(not is_val(t, 0.2, 0) for t in train) and all(is_val(t, 0.2, 0) for t in val)


def test_prepared_shards_feed_the_loader(stdlib):
    out, m, tok = stdlib
    from data_pipeline import build_loader
    from data_pipeline.read.config import WebDatasetConfig

    ld = build_loader(WebDatasetConfig(urls=str(out), shuffle=False, num_workers=0), rank=0,
                      world_size=1, micro_batch_size=1, seq_len=32)
    assert ld.vocab_size == m["vocab_size"] and Path(ld.tokenizer_dir) == (out / "tokenizer").resolve()
    first = read_docs(out)[0]
    assert next(iter(ld))["input_ids"][0].tolist() == first[:32].tolist()


def test_rerun_is_noop_and_changes_rebuild(tmp_path, stdlib, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(5):
        (src / f"d{i}.txt").write_text(f"document number {i} " * (i + 3))
    tok = str(stdlib[0] / "tokenizer")
    m1 = run(tmp_path / "out", source={"path": str(src)}, tokenizer={"path": tok})
    mtime = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run(tmp_path / "out", source={"path": str(src)}, tokenizer={"path": tok}) == m1
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == mtime
    (src / "d5.txt").write_text("a new document")
    m2 = run(tmp_path / "out", source={"path": str(src)}, tokenizer={"path": tok})
    assert m2["fingerprint"] != m1["fingerprint"] and m2["report"]["documents_read"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _corpus(tmp_path):
    """The same 6 documents as text files, JSONL, Parquet and save_to_disk data."""
    docs = [f"def f{i}():\n    return {i} * 'x'  # é ü {i}\n" * (i + 1) for i in range(6)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.py").write_text(d)
    with open(tmp_path / "c.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "content": d}, ensure_ascii=i % 2 == 0) + "\n")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": docs[:3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"content": docs[3:]}), tmp_path / "b.parquet")
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs})}).save_to_disk(
        str(tmp_path / "saved_dict"))
    return docs


def test_every_source_kind(tmp_path, stdlib):
    docs = _corpus(tmp_path)
    tok_dir = stdlib[0] / "tokenizer"
    tok = stdlib[2]
    kinds = {"txt": {"path": str(tmp_path / "txt")},
             "jsonl": {"path": str(tmp_path / "c.jsonl"), "text_field": "content"},
             "parquet": {"path": str(tmp_path / "*.parquet"), "text_field": "content"},
             "saved": {"path": str(tmp_path / "saved"), "text_field": "content"},
             "saved_dict": {"path": str(tmp_path / "saved_dict"), "text_field": "content"}}
    for name, source in kinds.items():
        out = tmp_path / f"out-{name}"
        m = run(out, source=source, tokenizer={"path": str(tok_dir)}, split={"val_fraction": 0})
        assert texts(out, tok) == docs, name
        assert m["report"]["documents_read"] == 6


def test_bad_input_is_counted_or_named(tmp_path, stdlib):
    tok = {"path": str(stdlib[0] / "tokenizer")}
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "good.txt").write_text("fine text")
    (tmp_path / "txt" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "txt" / "empty.txt").write_text("")
    (tmp_path / "txt" / "blank.txt").write_text("  \n\t\n")
    m = run(tmp_path / "o1", source={"path": str(tmp_path / "txt")}, tokenizer=tok,
            split={"val_fraction": 0})
    assert m["report"]["skipped"]["empty"] == 2 and m["report"]["utf8_replaced"] == 1
    assert sorted(texts(tmp_path / "o1", stdlib[2])) == ["caf\ufffd cr\ufffdme", "fine text"]
    m = run(tmp_path / "o2", source={"path": str(tmp_path / "txt")}, tokenizer=tok, on_bad_utf8="skip",
            prepare={"max_dropped_frac": 1.0})
    assert m["report"]["skipped"]["bad_utf8"] == 1 and m["totals"]["samples"] == 1

    lines = ['{"text": "one"}', "not json", '{"other": 1}', "", '{"text": 7}',
             b'{"text": "bad \xff byte"}'.decode("latin-1"), '{"text": "two"}']
    (tmp_path / "c.jsonl").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    m = run(tmp_path / "o3", source={"path": str(tmp_path / "c.jsonl")}, tokenizer=tok,
            prepare={"max_dropped_frac": 1.0})
    assert m["report"]["skipped"] == {"empty": 1, "bad_json": 1, "missing_field": 1,
                                      "not_text": 1, "bad_utf8": 0, "binary": 0}
    assert m["report"]["utf8_replaced"] == 1 and m["totals"]["samples"] == 3
    with pytest.raises(PrepareError, match=r"c\.jsonl:2: record is not valid JSON"):
        run(tmp_path / "o4", source={"path": str(tmp_path / "c.jsonl")}, tokenizer=tok,
            on_bad_record="raise")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(PrepareError, match=r"c\.jsonl:2: record has no field 'text'"):
        run(tmp_path / "o5", source={"path": str(tmp_path / "c.jsonl")}, on_bad_record="raise")
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_config_errors_before_any_work(tmp_path):
    with pytest.raises(PrepareConfigError, match="colour: unknown key"):
        load_prepare_config({"colour": 1, "num_proc": "two"})
    with pytest.raises(PrepareConfigError) as e:
        load_prepare_config({"out": str(tmp_path / "o"), "source": {"path": str(tmp_path / "nope")},
                             "tokenizer": {"path": str(tmp_path), "train": True},
                             "split": {"val_fraction": 1.5}, "on_bad_record": "ignore"})
    text = str(e.value)
    for needle in ("source.path=", "does not exist", "choose one", "val_fraction=1.5",
                   "on_bad_record='ignore'"):
        assert needle in text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareConfigError, match="not a prepare output"):
        load_prepare_config({"out": str(tmp_path / "mine")})
    assert not (tmp_path / "o").exists()


def test_mixed_weighted_sources_and_parallel_determinism(tmp_path, stdlib):
    tok = {"path": str(stdlib[0] / "tokenizer")}
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"text": f"source {name} doc {i} " * 20}) + "\n")
    sources = [{"path": str(tmp_path / "a.jsonl"), "weight": 3}, {"path": str(tmp_path / "b.jsonl"), "weight": 1}]
    kw = dict(sources=sources, tokenizer=tok, shard={"max_bytes": 8192}, split={"val_fraction": 0.25})
    m1 = run(tmp_path / "p1", **kw)
    m2 = run(tmp_path / "p2", num_proc=2, batch_docs=3, **kw)
    assert m1["splits"] == m2["splits"]  # same shards, byte for byte (sha256), any num_proc
    docs = texts(tmp_path / "p1", stdlib[2]) + texts(tmp_path / "p1", stdlib[2], "val")
    a = sum(d.startswith("source a") for d in docs)
    b = sum(d.startswith("source b") for d in docs)
    assert b >= 8 and a > 2 * b  # every doc of b at least once, a drawn ~3x as often
    assert m1["report"]["read_per_source"] == {str(tmp_path / "a.jsonl"): a,
                                               str(tmp_path / "b.jsonl"): b}


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"], vocab["<eos>"] = 70000, 70001
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        str(tmp_path / "tok"))
    (tmp_path / "c.txt").write_text("w1 w69999 w5")
    m = run(tmp_path / "o", source={"path": str(tmp_path / "c.txt")}, tokenizer={"path": str(tmp_path / "tok")},
            split={"val_fraction": 0})
    assert m["dtype"] == "uint32" and m["sample_ext"] == "u32"
    assert read_docs(tmp_path / "o")[0].tolist() == [1, 69999, 5, 70001]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli(tmp_path, stdlib):
    (tmp_path / "c.txt").write_text("hello world")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"out={tmp_path / 'o'}", "num_proc=1",
           f"tokenizer.path={stdlib[0] / 'tokenizer'}", "progress=false"]
    ok = subprocess.run(cmd + [f"source.path={tmp_path / 'c.txt'}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "train: 1 docs" in ok.stdout and (tmp_path / "o" / "manifest.json").is_file()
    bad = subprocess.run(cmd + [f"source.path={tmp_path / 'missing.jsonl'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "source.path=" in bad.stderr and "does not exist" in bad.stderr
