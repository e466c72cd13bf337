"""The webdataset loader: packing contract, global order, rank assignment, real tar shards."""
from __future__ import annotations

import os
import subprocess
from collections import Counter
from itertools import islice

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds

from data_pipeline import build_loader
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import WebDatasetLoader
from data_pipeline.schema import ConfigError, load
from tests.support.data import EOS, make_docs, make_shards


def loader(urls, *, rank=0, world=1, b=2, t=16, split="train", **kw) -> WebDatasetLoader:
    kw.setdefault("num_workers", 0)
    return build_loader(WebDatasetConfig(urls=str(urls), **kw), rank=rank, world_size=world,
                        micro_batch_size=b, seq_len=t, split=split)


def take(ld, n):
    return list(islice(iter(ld), n))


def ref_batch(docs, pos, b, t):
    """Independent, loop-by-loop packing of the unshuffled stream (docs in shard order)."""
    stream = np.concatenate(docs)
    starts = np.zeros(len(stream), bool)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    tok = lambda i: int(stream[i % len(stream)])  # noqa: E731
    start = lambda i: bool(starts[i % len(stream)])  # noqa: E731
    inp, lab, pid = [], [], []
    for r in range(b):
        s = pos + r * t
        inp.append([tok(s + j) for j in range(t)])
        lab.append([-100 if start(s + j + 1) else tok(s + j + 1) for j in range(t)])
        p, row = 0, []
        for j in range(t):
            p = 0 if j > 0 and start(s + j) else p
            row.append(p)
            p += 1
        pid.append(row)
    return {k: torch.tensor(v) for k, v in (("input_ids", inp), ("labels", lab), ("position_ids", pid))}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.int64 and torch.equal(a[k], b[k]), k


def test_packing_matches_reference_across_epochs(tmp_path):
    s = make_shards(tmp_path, sizes=(5, 2, 6))
    ld = loader(s.root, shuffle=False, b=3, t=11)
    n = s.total_tokens // 33 + 3  # runs past the first epoch boundary
    for i, batch in enumerate(take(ld, n)):
        assert_same(batch, ref_batch(s.docs, i * 33, 3, 11))
    assert ld.metrics()["data_epoch"] > 1.0
    assert ld.vocab_size == 1000 and ld.tokenizer_dir is None


def test_shuffled_epochs_cover_every_document_once(tmp_path):
    s = make_shards(tmp_path, sizes=(9, 1, 14, 4))
    ld = loader(s.root, shuffle_buffer=5, seed=7)
    nt = s.total_tokens
    orders = []
    for e in range(3):
        pieces = list(ld.order.pieces(e * nt, nt))
        seen = Counter()
        for p in pieces:
            seen[p.doc] += p.take
        assert seen == {g: len(d) for g, d in enumerate(s.docs)}
        orders.append([p.doc for p in pieces])
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != sorted(orders[0])
    again = loader(s.root, shuffle_buffer=5, seed=7)
    assert [p.doc for p in again.order.pieces(0, nt)] == orders[0]
    other = loader(s.root, shuffle_buffer=5, seed=8)
    assert [p.doc for p in other.order.pieces(0, nt)] != orders[0]
    # shuffle_buffer=0: shards still change order per epoch, documents keep their shard order.
    plain = loader(s.root, shuffle_buffer=0, seed=7)
    docs = list(dict.fromkeys(p.doc for p in plain.order.pieces(0, nt)))
    shards = [int(np.searchsorted(plain.table.doc_base, d, side="right")) - 1 for d in docs]
    runs = list(dict.fromkeys(shards))
    assert runs != sorted(runs) and sorted(docs) == list(range(len(s.docs)))
    assert all(docs[i] < docs[i + 1] for i in range(len(docs) - 1) if shards[i] == shards[i + 1])


@pytest.mark.parametrize("sizes,world,workers", [((7, 3, 12), 2, 0), ((6,), 4, 2)])
def test_ranks_split_the_global_stream(tmp_path, sizes, world, workers):
    """Uneven shards and fewer shards than ranks x workers: every rank yields batches, and the
    ranks' batches, interleaved, are exactly the one-rank stream (world-size independent)."""
    s = make_shards(tmp_path, sizes=sizes)
    rounds = 5
    single = take(loader(s.root, b=2, t=8), rounds * world)
    per_rank = [take(loader(s.root, rank=r, world=world, b=2, t=8, num_workers=workers), rounds)
                for r in range(world)]
    for k in range(rounds):
        for r in range(world):
            assert_same(per_rank[r][k], single[k * world + r])


def test_workers_do_not_change_the_batches(tmp_path):
    s = make_shards(tmp_path)
    ref = take(loader(s.root, b=2, t=8), 9)
    assert len(ref) == 9
    for batch, want in zip(take(loader(s.root, b=2, t=8, num_workers=2, prefetch_factor=2), 9), ref, strict=True):
        assert_same(batch, want)


def test_brace_urls_and_val_split(tmp_path):
    s = make_shards(tmp_path, sizes=(4, 4), val_sizes=(3, 2))
    a = take(loader(s.urls, shuffle=False), 3)
    b = take(loader(s.root / "manifest.json", shuffle=False), 3)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    val = loader(s.urls, split="val", shuffle=False, b=1, t=200)
    ids = set(next(iter(val))["input_ids"].unique().tolist()) - {EOS}
    assert ids == {int(d[0]) for d in s.val_docs}


def test_our_shards_read_by_tar_and_plain_webdataset(tmp_path):
    s = make_shards(tmp_path, sizes=(5, 3))
    listing = subprocess.run(["tar", "-tf", str(s.shard_paths[0])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing == [f"{i:012d}.u16" for i in range(5)]
    got = [np.frombuffer(x["u16"], "<u2") for x in
           wds.WebDataset([str(p) for p in s.shard_paths], shardshuffle=False).decode()]
    assert len(got) == 8 and all(np.array_equal(g, d) for g, d in zip(got, s.docs, strict=True))


def test_plain_tarwriter_shards_without_manifest(tmp_path):
    """Shards a user writes with webdataset.TarWriter (documented format, extra members, no
    manifest and no index) are scanned and read; u32 arrays work too."""
    docs = make_docs(6, vocab_size=70000, content="random", seed=3)
    paths = []
    for i, part in enumerate((docs[:4], docs[4:])):
        paths.append(tmp_path / f"plain-{i}.tar")
        with wds.TarWriter(str(paths[-1])) as w:
            for j, d in enumerate(part):
                w.write({"__key__": f"s{i}d{j}", "u32": d.astype("<u4").tobytes(), "txt": "meta"})
    urls = f"file://{tmp_path}/plain-{{0..1}}.tar"
    with pytest.raises(ValueError, match="data.vocab_size"):
        loader(urls)
    with pytest.raises(ValueError, match="data.val_urls"):
        loader(urls, split="val", vocab_size=70000)
    ld = loader(urls, shuffle=False, vocab_size=70000, b=1, t=15)
    assert_same(next(iter(ld)), ref_batch(docs, 0, 1, 15))


def test_pipe_urls_need_allow_pipe(tmp_path):
    s = make_shards(tmp_path, sizes=(4,))
    url = f"pipe:cat {s.shard_paths[0]}"
    problems = WebDatasetConfig(urls=url).validate()
    assert any("allow_pipe" in p for p in problems)
    with pytest.raises(ValueError, match="allow_pipe"):
        loader(url, manifest=str(s.root / "manifest.json"))
    ld = loader(url, allow_pipe=True, cache_dir=str(tmp_path / "cache"), shuffle=False,
                manifest=str(s.root / "manifest.json"))
    assert_same(next(iter(ld)), ref_batch(s.docs, 0, 2, 16))


def test_config_problems_and_missing_paths(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(WebDatasetConfig, {"urls": str(tmp_path / "nope/shard-{0..2}.tar"), "on_error": "ignore",
                                "num_workers": -1, "manifest": str(tmp_path / "m.json")}, prefix="data")
    text = "\n".join(err.value.problems)
    assert "data.on_error='ignore'" in text and "data.num_workers=-1" in text
    assert "data.manifest=" in text
    assert WebDatasetConfig(urls=str(tmp_path)).validate() == []
    with pytest.raises(ValueError, match="nope/shard-0.tar, .*does not exist.*data_pipeline.prepare"):
        loader(tmp_path / "nope/shard-{0..2}.tar")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pin_memory_with_workers(tmp_path):
    s = make_shards(tmp_path)
    ld = build_loader(WebDatasetConfig(urls=str(s.root), num_workers=1), rank=0, world_size=1,
                      micro_batch_size=2, seq_len=8, pin_memory=True)
    batch = next(iter(ld))
    assert all(v.is_pinned() for v in batch.values())
    assert_same({k: v.cuda(non_blocking=True).cpu() for k, v in batch.items()},
                take(loader(s.root, b=2, t=8), 1)[0])


def _mapped_file(pid: int, address: int) -> str | None:
    """The file a process maps at `address` (None: anonymous memory)."""
    for line in open(f"/proc/{pid}/maps"):
        span, *_, last = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return last.strip() if last.startswith("/") else None
    return None


def test_workers_map_the_rank_shard_index_instead_of_a_copy(tmp_path):
    """Workers start from a forkserver and get their stream by pickle; the shard table's
    per-document arrays arrive as the rank's own shared memory (data_pipeline/read/shared.py)."""
    s = make_shards(tmp_path)
    ld = loader(s.root, b=2, t=8, num_workers=1)
    # twin: before the workers start, the rank's index is plain (anonymous) memory
    assert _mapped_file(os.getpid(), ld.table.offsets.ctypes.data) is None
    it = iter(ld)
    next(it)
    files = {name: _mapped_file(os.getpid(), getattr(ld.table, name).ctypes.data)
             for name in ("offsets", "lengths", "cum_tokens")}
    assert all(f and f.startswith("/dev/shm/") for f in files.values()), files
    server = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    worker_maps = "".join(open(f"/proc/{w.pid}/maps").read() for w in server[0].children())
    assert all(f in worker_maps for f in files.values())
    it.close()


class _ManyStreams(torch.utils.data.IterableDataset):
    """What a mixture of `n` chat sources sends each worker: n streams' shard indexes (7 arrays each)."""

    def __init__(self, n: int) -> None:
        from tests.support.streams import index_stream

        self.streams = [index_stream(1_000, chat=True) for _ in range(n)]

    def __iter__(self):
        yield sum(int(s.spans.reader.table.cum_tokens[-1]) for s in self.streams)


@pytest.mark.parametrize("budget", ["default", "none"])
def test_a_mixture_of_many_sources_starts_its_workers(budget, monkeypatch):
    """40 chat sources are 280 shared arrays, more file descriptors than Python's forkserver passes to
    a worker (251): past SHARED_BUDGET the rest go as copies and the worker starts (the twin, with no
    budget: the start fails as it did before the budget)."""
    import warnings

    import data_pipeline.read.shared as S
    from data_pipeline.read.stream import worker_context

    if budget == "none":
        monkeypatch.setattr(S, "SHARED_BUDGET", 10**6)
    monkeypatch.setattr(S, "_warned", set())
    data = _ManyStreams(40)
    want = next(iter(data))
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=1, multiprocessing_context=worker_context())
    if budget == "none":
        with pytest.raises(ValueError, match="too many fds"):
            next(iter(loader))
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert next(iter(loader)) == want
    assert any("get a copy of the others" in str(w.message) for w in seen)


FULL_SHM_CHILD = """
import sys, warnings
from itertools import islice
import torch
sys.path.insert(0, sys.argv[2])
from data_pipeline import build_loader
from data_pipeline.read.config import WebDatasetConfig
def batches(workers):
    ld = build_loader(WebDatasetConfig(urls=sys.argv[1], num_workers=workers), rank=0, world_size=1,
                      micro_batch_size=2, seq_len=16, split="train")
    return [b["input_ids"] for b in islice(iter(ld), 3)]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    got = batches(1)
assert all(torch.equal(a, b) for a, b in zip(got, batches(0))) and len(got) == 3
print("WARNINGS", [str(w.message) for w in seen])
"""


@pytest.fixture(scope="module")
def corpus_60k(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("c60k"), sizes=(30_000, 30_000), val_sizes=(), min_len=2, max_len=4,
                       vocab_size=256, content="random")


@pytest.mark.parametrize("shm", ["1m", "host"])
def test_a_full_dev_shm_sends_workers_a_copy_and_the_same_batches(corpus_60k, shm):
    """A container's small /dev/shm (here a real 1 MiB tmpfs mounted over it in a mount namespace of
    its own) cannot hold the shard index (60k documents, ~1.4 MB): the rank warns, naming the fix, and
    its worker gets a copy; the batches equal a worker-less loader's. The twin: on the host's /dev/shm
    the same run shares the index without a warning."""
    from tests.helpers import PY, REPO, child_env

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root or user namespaces)")
    child = [PY, "-c", FULL_SHM_CHILD, str(corpus_60k.root), str(REPO)]
    cmd = (["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh", *child] if shm == "1m" else child)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [w for w in proc.stdout.split("WARNINGS", 1)[1].split("', '") if "no room in shared memory" in w]
    if shm == "1m":
        assert warned and "/dev/shm (docker run --shm-size)" in warned[0], proc.stdout
    else:
        assert not warned, proc.stdout


USR2_CHILD = """
import os, signal, sys, time
from itertools import islice
import psutil
sys.path.insert(0, sys.argv[2])
from data_pipeline import build_loader
from data_pipeline.read.config import WebDatasetConfig
ld = build_loader(WebDatasetConfig(urls=sys.argv[1], num_workers=1), rank=0, world_size=1, micro_batch_size=1,
                  seq_len=8, split="train")
it = iter(ld)
next(it)
server = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())][0]
worker = server.children()[0]
worker.send_signal(signal.SIGUSR2)
time.sleep(1.0)
print("ALIVE", worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE, flush=True)
print("BATCHES", len(list(islice(it, 5))), flush=True)
"""


def test_sigusr2_prints_a_worker_stack_and_the_worker_goes_on(tmp_path):
    """`kill -USR2` on a DataLoader worker prints its threads' stacks (as on its rank) and loading goes
    on: a worker started from the forkserver would otherwise die of the signal's default action."""
    from tests.helpers import PY, REPO, child_env

    s = make_shards(tmp_path, sizes=(40, 40))
    proc = subprocess.run([PY, "-c", USR2_CHILD, str(s.root), str(REPO)], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALIVE True" in proc.stdout and "BATCHES 5" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Thread 0x" in proc.stderr and "rank-watch" not in proc.stdout, proc.stderr[-2000:]
