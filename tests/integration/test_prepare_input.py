"""prepare on hostile input: binary files in a text source, inputs with no documents, one huge
document in bounded memory, and a manifest.json of any bytes."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline.prepare import PrepareError, encode
from data_pipeline.shards.manifest import ManifestError, load_manifest
from tests.helpers import PY, REPO, TINY, child_env, run_train
from tests.integration.test_data_prepare import read_docs, run
from tests.support.data import make_shards


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "prep"
    run(out, source={"path": "stdlib", "max_files": 12}, tokenizer={"vocab_size": 300},
        split={"val_fraction": 0})
    return out / "tokenizer"


def _corpus_text(chars: int) -> str:
    """Real text (standard-library sources, with their runs of blanks and tabs) of `chars` length."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    text = "".join(p.read_text(errors="replace") for p in files)
    return (text * (chars // len(text) + 1))[:chars]


def test_pieces_cut_at_a_single_space_and_rejoin_exactly():
    text = _corpus_text(50_000)
    parts = list(encode.pieces(text, 4096))
    assert "".join(parts) == text and len(parts) > 10
    assert all(len(p) <= 4096 for p in parts)
    assert all(p.startswith(" ") and not p[1].isspace() and not prev[-1].isspace()
               for prev, p in zip(parts, parts[1:]))
    blob = "x" * 10_000  # no space at all: hard cuts, nothing lost
    assert "".join(encode.pieces(blob, 4096)) == blob and len(list(encode.pieces(blob, 4096))) == 3


def test_a_long_document_gives_the_tokens_of_the_whole_text(tmp_path, tokenizer_dir):
    text = _corpus_text(3 * encode.PIECE_CHARS + 12345)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "long.txt").write_text(text)
    m = run(tmp_path / "out", source={"path": str(tmp_path / "src")}, tokenizer={"path": str(tokenizer_dir)},
            split={"val_fraction": 0})
    assert m["report"]["pieced_documents"] == 1 and m["report"]["pieces_exact"]  # pieces were used
    (doc,) = read_docs(tmp_path / "out")
    whole = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert doc[:-1].tolist() == whole and doc[-1] == m["eos_token_id"]


def test_a_10mb_document_is_tokenized_in_bounded_memory(tmp_path, tokenizer_dir):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "huge.txt").write_text(_corpus_text(10_000_000))
    child = textwrap.dedent(f"""
        import resource, subprocess, sys
        rc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "source.path={tmp_path / 'src'}",
                             "tokenizer.path={tokenizer_dir}", "out={tmp_path / 'out'}", "num_proc=1",
                             "progress=false", "split.val_fraction=0"]).returncode
        print("PEAK_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", rc)
    """)
    res = subprocess.run([PY, "-c", child], cwd=REPO, env=child_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=600)
    peak_kb, rc = int(res.stdout.split("PEAK_KB ")[1].split()[0]), res.stdout.split("RC ")[1].split()[0]
    assert rc == "0", res.stderr[-3000:]
    assert "tokenized in pieces" in res.stdout
    assert peak_kb < 1.5 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GiB for a 10 MB document"  # was 2.4 GiB
    assert load_manifest(tmp_path / "out" / "manifest.json")["totals"]["tokens"] > 1_000_000


def _binary_dir(root: Path) -> Path:
    rng = random.Random(0)
    src = root / "mixed"
    src.mkdir()
    (src / "good.txt").write_text("a plain text document")
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))  # kept, replaced
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(4000)))
    (src / "blob.bin").write_bytes(bytes(rng.randrange(128, 256) for _ in range(4000)))  # no NUL, not UTF-8
    return src


def test_binary_files_in_a_text_source_are_skipped_named_and_counted(tmp_path, tokenizer_dir, capsys):
    src = _binary_dir(tmp_path)
    m = run(tmp_path / "out", source={"path": str(src)}, tokenizer={"path": str(tokenizer_dir)},
            split={"val_fraction": 0}, prepare={"max_dropped_frac": 1.0})
    r = m["report"]
    assert r["skipped"]["binary"] == 2 and r["utf8_replaced"] == 1 and m["totals"]["samples"] == 2
    assert sorted(r["skipped_examples"]["binary"]) == [str(src / "blob.bin"), str(src / "image.png")]
    assert f"binary: 2 (e.g. {src / 'blob.bin'}" in capsys.readouterr().out
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert sorted(tok.decode(d[:-1].tolist()) for d in read_docs(tmp_path / "out")) == [
        "a plain text document", "caf\ufffd cr\ufffdme br\ufffdl\ufffde"]


def test_binary_files_are_skipped_when_prepare_trains_the_tokenizer_too(tmp_path):
    src = _binary_dir(tmp_path)
    m = run(tmp_path / "out", source={"path": str(src)}, tokenizer={"vocab_size": 300}, split={"val_fraction": 0},
            prepare={"max_dropped_frac": 1.0})
    assert m["report"]["skipped"]["binary"] == 2 and m["totals"]["samples"] == 2


def test_an_input_with_no_documents_is_an_error_naming_it(tmp_path, tokenizer_dir):
    src = _binary_dir(tmp_path)
    for name in ("good.txt", "latin1.txt"):
        (src / name).unlink()
    (src / "blank.txt").write_text(" \n\t ")
    with pytest.raises(PrepareError) as err:
        run(tmp_path / "out", source={"path": str(src)}, tokenizer={"path": str(tokenizer_dir)})
    msg = str(err.value)
    assert f"{src} gave no documents" in msg and "binary=2" in msg and "empty=1" in msg
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    (tmp_path / "ok.jsonl").write_text('{"text": "one document"}\n')
    with pytest.raises(PrepareError, match=f"{src} gave no documents"):  # one empty input of two
        run(tmp_path / "out", sources=[{"path": str(tmp_path / "ok.jsonl")}, {"path": str(src)}],
            tokenizer={"path": str(tokenizer_dir)})


def test_no_documents_through_the_cli_is_exit_2_without_a_traceback(tmp_path, tokenizer_dir):
    src = _binary_dir(tmp_path)
    for name in ("good.txt", "latin1.txt"):
        (src / name).unlink()
    res = subprocess.run([PY, "-m", "data_pipeline.prepare", f"source.path={src}", f"out={tmp_path / 'out'}",
                          "progress=false", "num_proc=1"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{src} gave no documents" in res.stderr


GARBAGE = {"binary": b"\x00\x9c\xffPK\x03\x04", "empty": b"", "latin-1": "\xe9t\xe9".encode("latin-1"),
           "list": b"[1, 2]", "no splits": json.dumps({"format": "scaletrain-shards/1"}).encode(),
           "bad shard": json.dumps({"format": "scaletrain-shards/1", "sample_ext": "u16", "vocab_size": 9,
                                    "tokenizer": None, "splits": {"train": {"shards": [{"path": 5}]},
                                                                  "val": {"shards": []}}}).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("manifest"))


@pytest.mark.parametrize("name", [*sorted(GARBAGE), "directory"])
def test_a_manifest_of_any_bytes_is_a_clear_error_naming_it(name, shards, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shards.root, root)
    path = root / "manifest.json"
    if name == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(GARBAGE[name])
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and "rerun `python -m data_pipeline.prepare`" in str(err.value)


def test_a_garbage_manifest_stops_the_trainer_with_a_message_not_a_traceback(shards, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shards.root, root)
    (root / "manifest.json").write_bytes(GARBAGE["binary"])
    out = run_train([*TINY, "data=webdataset", f"data.urls={root}", "trainer.max_steps=1",
                     f"run.dir={tmp_path / 'run'}"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"manifest {root / 'manifest.json'} is not JSON" in out.stderr


def test_prepare_over_a_garbage_manifest_rebuilds(tmp_path, tokenizer_dir):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    out = tmp_path / "out"
    run(out, source={"path": str(tmp_path / "a.jsonl")}, tokenizer={"path": str(tokenizer_dir)})
    (out / "manifest.json").write_bytes(GARBAGE["bad shard"])
    m = run(out, source={"path": str(tmp_path / "a.jsonl")}, tokenizer={"path": str(tokenizer_dir)})
    assert m["totals"]["samples"] == 2 and load_manifest(out / "manifest.json") == m
    assert os.path.getsize(out / "manifest.json") > 100 and np.sum([len(d) for d in read_docs(out)]) > 2
