"""Remote streaming: our lazy, prefetching loader over HTTP against local files and webdataset.

    python bench/remote_streaming.py [--latency-ms 50] [--mbps 200] [--steps 60]

A real HTTP server on 127.0.0.1 (tests/support/http_server.py) adds `--latency-ms` to every
request and caps each connection at `--mbps` megabytes/s. In one run:

  (a) time to first batch for corpora of 20, 200 and 2,000 shards (fresh cache each time):
      the manifest, the index bundle and the first shards only, so it should stay flat;
  (b) steady tokens/s of our loader over HTTP against the same shards read locally, per wall
      second and per CPU second of the loader's process (its fetch threads included);
  (c) plain `webdataset` over the same server, `WebDataset("pipe:curl -s URL")`, each document
      decoded to a tensor, as users stream shards today (tokens/s; ours must be no slower);
  (d) data_wait_frac of a tiny-model CPU training run (`python -m train`) on the remote corpus.

Ends with one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.read.config import WebDatasetConfig  # noqa: E402
from data_pipeline.read.loader import WebDatasetLoader  # noqa: E402
from tests.support.data import make_shards  # noqa: E402
from tests.support.http_server import ShardServer  # noqa: E402

B, T = 8, 512
BIG_SHARDS = 40


class served:
    """ShardServer in its own process (as a real server would be: no GIL shared with the loader)."""

    def __init__(self, root: Path, **kw) -> None:
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(str(root), kw, self.q), daemon=True)

    def __enter__(self) -> "served":
        self.proc.start()
        self.url = self.q.get(timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join()


def _serve(root: str, kw: dict, q) -> None:
    with ShardServer(root, **kw) as srv:
        q.put(srv.url)
        threading.Event().wait()


def corpus(work: Path, shards: int, docs: int, doc_len: int) -> Path:
    root = work / f"c{shards}x{docs}x{doc_len}"
    if not (root / "shards" / "manifest.json").is_file():
        make_shards(root, sizes=(docs,) * shards, val_sizes=(1,), min_len=doc_len // 2,
                    max_len=doc_len * 3 // 2, vocab_size=32000, content="random")
    return root / "shards"


def loader(urls: str, cache: Path, shuffle_buffer: int, workers: int = 0, prefetch: int = 4) -> WebDatasetLoader:
    cfg = WebDatasetConfig(urls=urls, cache_dir=str(cache), num_workers=workers, prefetch_shards=prefetch,
                           shuffle_buffer=shuffle_buffer)
    return WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=B, seq_len=T)


def first_batch_s(url: str, cache: Path, docs_per_shard: int) -> tuple[float, float]:
    """(start-up: manifest + indexes, first batch: start-up + its shards) in seconds."""
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ld = loader(url, cache, docs_per_shard)
    t1 = time.perf_counter()
    next(iter(ld))
    return t1 - t0, time.perf_counter() - t0


def tokens_per_s(it, batches: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process: loader + fetch threads)."""
    next(it)  # warm: the first batch is (a)'s business
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    n = batches * B * T
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def webdataset_curl(url: str, n_shards: int, tokens: int) -> float:
    import torch
    import webdataset as wds

    ds = wds.WebDataset(f"pipe:curl -s {url}/train/shard-{{000000..{n_shards - 1:06d}}}.tar",
                        shardshuffle=False)
    t0, got = time.perf_counter(), 0
    for sample in ds:
        got += len(torch.from_numpy(np.frombuffer(sample["u16"], dtype="<u2").astype(np.int64)))
        if got >= tokens:
            break
    return got / (time.perf_counter() - t0)


def train_wait_frac(url: str, work: Path, steps: int) -> dict:
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", "model=tiny", "data=webdataset", f"data.urls={url}/",
           f"data.cache_dir={work / 'train-cache'}", "data.num_workers=1", "trainer.seq_len=128",
           "trainer.micro_batch_size=4", f"trainer.max_steps={steps}", "trainer.log_every=1",
           "checkpoint.at_end=false", "tracking=none", "export=none", f"run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "data_wait_s" in r and r["step"] > 1]
    return {"data_wait_frac": round(sum(r["data_wait_s"] for r in recs) / sum(r["step_time_s"] for r in recs), 5),
            "median_step_ms": round(1000 * float(np.median([r["step_time_s"] for r in recs])), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--mbps", type=float, default=200, help="per-connection cap, MB/s")
    ap.add_argument("--batches", type=int, default=15000,
                    help="B=8 x T=512 tokens each (the default reads 3/4 of the 80M-token corpus)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "remote_streaming"))
    a = ap.parse_args()
    work = Path(a.work)
    slow = {"latency_s": a.latency_ms / 1000, "bandwidth": a.mbps * 1e6}
    out: dict = {}
    for n in (20, 200, 2000):   # shards of 20 documents of ~64 tokens
        with served(corpus(work, n, 20, 64), **slow) as srv:
            start, first = first_batch_s(srv.url + "/", work / "cache", 20)
            out[f"first_batch_s_{n}"], out[f"start_up_s_{n}"] = round(first, 3), round(start, 3)
    big = corpus(work, BIG_SHARDS, 2000, 1000)   # shards of ~4 MB, 2M tokens (prepare's default is 64 MB)
    n_tokens = a.batches * B * T
    local, local_cpu = tokens_per_s(iter(loader(str(big), work / "cache", 1000)), a.batches)
    with served(big, **slow) as srv:
        shutil.rmtree(work / "cache", ignore_errors=True)
        remote, remote_cpu = tokens_per_s(iter(loader(srv.url + "/", work / "cache", 1000)), a.batches)
        curl = webdataset_curl(srv.url, BIG_SHARDS, n_tokens)
        out.update(train_wait_frac(srv.url, work, a.steps))
    ratios = {"first_batch_2000_over_20": round(out["first_batch_s_2000"] / out["first_batch_s_20"], 3),
              "remote_over_local_tokens": round(remote / local, 3),
              "remote_over_local_per_cpu_s": round(remote_cpu / local_cpu, 3),
              "remote_over_webdataset_curl": round(remote / curl, 3)}
    print(json.dumps({**ratios, **out, "remote_tokens_per_s": round(remote), "local_tokens_per_s": round(local),
                      "webdataset_curl_tokens_per_s": round(curl), "latency_ms": a.latency_ms,
                      "mbps_per_connection": a.mbps}))


if __name__ == "__main__":
    main()
