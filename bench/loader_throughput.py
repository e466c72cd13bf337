"""Loader throughput: our packed-batch loader against the ways a user would read the data.

    python bench/loader_throughput.py [--files 400] [--batch 8] [--seq-len 2048] [--seconds 3]

Corpus: `--files` .py files of this Python's standard library (no download), as JSONL with
one document per top-level block (a def/class with its body; typical document sizes, a few
hundred tokens) and, to show the large-document regime, one document per file. Both are
prepared once into --work (a no-op on reruns). On the same shards, in one run:

  (a) raw sequential read of the tar bytes (the ceiling),
  (b) a plain webdataset pipeline, `WebDataset(urls).decode()`, each document to an int64 tensor,
  (c) HF datasets streaming of the source JSONL, tokenized on the fly (.map, batched),
  (d) our loader producing packed [B, T] batches (input_ids, labels, position_ids) with 0, 1
      and 2 DataLoader workers.

Figures are tokens per CPU-second ("per core": the process plus its workers) and per wall
second. Ends with one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import build_loader  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.prepare.config import SourceConfig, load_prepare_config  # noqa: E402
from data_pipeline.prepare.sources import resolve_source  # noqa: E402
from data_pipeline.read.config import WebDatasetConfig  # noqa: E402
from data_pipeline.shards.manifest import load_manifest  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers)."""
    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(fn, min_seconds: float) -> dict:
    """Run fn() (returns tokens) repeatedly for at least min_seconds of CPU; tokens/s."""
    tokens, c0, w0 = 0, cpu_seconds(), time.perf_counter()
    while True:
        tokens += fn()
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
        if cpu >= min_seconds or wall >= 4 * min_seconds:
            return {"tokens": tokens, "per_cpu_s": tokens / max(cpu, 1e-9), "per_wall_s": tokens / wall}


def write_corpus(work: Path, files: int) -> dict[str, Path]:
    srcs = resolve_source(SourceConfig(path="stdlib", max_files=files)).files
    blocks, whole = work / "blocks.jsonl", work / "files.jsonl"
    if not blocks.is_file():
        with open(blocks, "w") as fb, open(whole, "w") as fw:
            for f in srcs:
                text = Path(f).read_text(encoding="utf-8", errors="replace")
                fw.write(json.dumps({"text": text}) + "\n")
                for part in re.split(r"\n(?=(?:def|class|async def) )", text):
                    if part.strip():
                        fb.write(json.dumps({"text": part}) + "\n")
    return {"blocks": blocks, "files": whole}


def prepared(work: Path, jsonl: Path, name: str, tokenizer: str | None) -> Path:
    out = work / name
    tok = {"path": tokenizer, "train": False} if tokenizer else {"vocab_size": 8192}
    prepare(load_prepare_config({"source": {"path": str(jsonl)}, "out": str(out), "tokenizer": tok,
                                 "split": {"val_fraction": 0.0}, "shard": {"max_bytes": 16 << 20},
                                 "progress": False}))
    return out


def raw_read(urls: list[str], tokens: int):
    def run() -> int:
        for u in urls:
            with open(u, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
        return tokens
    return run


def plain_webdataset(urls: list[str]):
    import webdataset as wds

    def run() -> int:
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            n += len(torch.from_numpy(np.frombuffer(sample["u16"], "<u2").astype(np.int64)))
        return n
    return run


def hf_streaming(jsonl: Path, tokenizer_dir: str, docs: int):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def run() -> int:
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", streaming=True)
        ds = ds.map(lambda b: {"ids": tok(b["text"])["input_ids"]}, batched=True,
                    remove_columns=["text"])
        n = 0
        for i, row in enumerate(ds):
            n += len(torch.tensor(row["ids"] + [tok.eos_token_id], dtype=torch.int64))
            if i + 1 >= docs:
                break
        return n
    return run


def ours(root: Path, workers: int, batch: int, seq_len: int, min_seconds: float) -> dict:
    """Steady state of one long-lived iterator (worker start-up is reported separately)."""
    cfg = WebDatasetConfig(urls=str(root), num_workers=workers, prefetch_factor=4)
    t0 = time.perf_counter()
    ld = build_loader(cfg, rank=0, world_size=1, micro_batch_size=batch, seq_len=seq_len)
    it = iter(ld)
    for _ in range(2 * workers + 1):
        next(it)
    startup = time.perf_counter() - t0

    def run() -> int:
        return sum(next(it)["input_ids"].numel() for _ in range(20))

    fig = measure(run, min_seconds)
    it.close()
    return {**fig, "startup_s": startup}


def report(key: str, fig: dict) -> None:
    extra = f"  (start-up {fig['startup_s']:.2f} s)" if "startup_s" in fig else ""
    print(f"  {key:16s} {fig['per_cpu_s'] / 1e6:9.2f} M tokens/CPU-s "
          f"{fig['per_wall_s'] / 1e6:9.2f} M tokens/wall-s{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=3.0, help="min CPU seconds per figure")
    ap.add_argument("--hf-docs", type=int, default=2000, help="documents per (c) pass")
    ap.add_argument("--work", default="/tmp/scaletrain-bench-loader")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpora = write_corpus(work, args.files)
    blocks = prepared(work, corpora["blocks"], "shards-blocks", None)
    tok_dir = str(blocks / "tokenizer")
    whole = prepared(work, corpora["files"], "shards-files", tok_dir)
    figures: dict[str, dict] = {}
    for name, root in (("blocks", blocks), ("files", whole)):
        m = load_manifest(root / "manifest.json")
        urls = [str(root / s["path"]) for s in m["splits"]["train"]["shards"]]
        total = m["splits"]["train"]["tokens"]
        print(f"[{name}] {m['splits']['train']['samples']:,} docs, {total:,} tokens "
              f"({total / m['splits']['train']['samples']:,.0f} tokens/doc), {len(urls)} shards", flush=True)
        runs = {"a_raw_read": raw_read(urls, total), "b_webdataset": plain_webdataset(urls)}
        if name == "blocks":
            runs["c_hf_streaming"] = hf_streaming(corpora["blocks"], tok_dir, args.hf_docs)
        for key, fn in runs.items():
            fig = figures[f"{name}.{key}"] = measure(fn, args.seconds)
            report(key, fig)
        for w in (0, 1, 2):
            fig = figures[f"{name}.d_ours_{w}w"] = ours(root, w, args.batch, args.seq_len, args.seconds)
            report(f"d_ours_{w}w", fig)
    cpu = {k: round(v["per_cpu_s"]) for k, v in figures.items()}
    wall = {k: round(v["per_wall_s"]) for k, v in figures.items()}
    ratios = {
        "ours0_vs_webdataset_per_core": cpu["blocks.d_ours_0w"] / cpu["blocks.b_webdataset"],
        "ours0_vs_hf_streaming_per_core": cpu["blocks.d_ours_0w"] / cpu["blocks.c_hf_streaming"],
        "ours2_vs_webdataset_per_core": cpu["blocks.d_ours_2w"] / cpu["blocks.b_webdataset"],
        "ours2_vs_webdataset_wall": wall["blocks.d_ours_2w"] / wall["blocks.b_webdataset"],
        "files_ours0_vs_webdataset_per_core": cpu["files.d_ours_0w"] / cpu["files.b_webdataset"],
    }
    print(json.dumps({**{k: round(v, 2) for k, v in ratios.items()},
                      "tokens_per_cpu_s": cpu, "tokens_per_wall_s": wall,
                      "batch": args.batch, "seq_len": args.seq_len, "files": args.files}))


if __name__ == "__main__":
    main()
