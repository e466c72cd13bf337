"""What a DataLoader worker costs per document of the corpus: its private memory and start time.

    OMP_NUM_THREADS=1 python bench/worker_memory.py [--docs 1000000] [--rounds 3] [--baseline DIR]

Workers start from a forkserver and receive their RankStream by pickle (data_pipeline/read/stream.py);
the shard table's per-document arrays go to them as shared memory (shared.py), not as a copy. On a
corpus of `--docs` tiny documents (make_shards, 8 shards; built once under $TMPDIR/worker_memory),
each round runs a fresh process per tree (`--baseline DIR`: an older checkout, e.g. `git archive
754bb0f | tar -x -C DIR`; interleaved with this tree) that builds a 1-worker loader and reports:

  first_s:   construction to first batch (includes the forkserver's start, ~2 s);
  second_s:  a second iteration's first batch (fresh worker, warm forkserver: the per-worker start);
  uss_mib:   the second worker's private memory (Private_Clean + Private_Dirty of smaps_rollup),
             after its first batch; rss_mib its resident set (shared pages included).

Ends with one JSON line of medians per tree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smaps(pid: int) -> dict[str, float]:
    """MiB of a process's resident and private memory."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        kb[key] = int(value.split()[0])
    return {"rss_mib": kb["Rss"] / 1024, "uss_mib": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}


def worker_pids() -> list[int]:
    """This process's DataLoader workers: children of its forkserver (grandchildren of us)."""
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                grand = int((Path(f"/proc/{ppid}") / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if grand == me and ppid != me:
                out.append(int(d.name))
    return out


def child(root: str) -> None:
    """One measurement, in a fresh process of the tree on sys.path."""
    from data_pipeline.read.config import WebDatasetConfig
    from data_pipeline.read.loader import WebDatasetLoader

    t0 = time.perf_counter()
    loader = WebDatasetLoader(WebDatasetConfig(urls=root, num_workers=1, prefetch_factor=1),
                              rank=0, world_size=1, micro_batch_size=8, seq_len=128)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    it.close()
    time.sleep(0.5)   # the first worker exits
    t1 = time.perf_counter()
    it = iter(loader)
    next(it)
    second = time.perf_counter() - t1
    pids = worker_pids()
    assert len(pids) == 1, pids
    print(json.dumps({"first_s": first, "second_s": second, **smaps(pids[0])}))
    it.close()


def corpus(docs: int) -> str:
    root = Path(tempfile.gettempdir()) / "worker_memory" / f"docs{docs}"
    if not (root / "shards" / "manifest.json").exists():
        sys.path.insert(0, str(REPO))
        from tests.support.data import make_shards
        make_shards(root, sizes=(docs // 8,) * 8, val_sizes=(1,), min_len=2, max_len=4, content="random")
    return str(root / "shards")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="an older tree to compare with, interleaved")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    root = corpus(args.docs)
    trees = {"baseline": args.baseline, "this": str(REPO)} if args.baseline else {"this": str(REPO)}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, __file__, "--child", root], env=env, cwd=tree,
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    print(json.dumps({"docs": args.docs, **{name: {k: round(statistics.median(r[k] for r in rs), 3)
                                                   for k in rs[0]} for name, rs in runs.items()}}))


if __name__ == "__main__":
    main()
