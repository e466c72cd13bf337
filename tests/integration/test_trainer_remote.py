"""The real trainer (`python -m train data=webdataset data.urls=...`) on remote corpora served
from 127.0.0.1: losses equal the same run on local files, only the needed shards are fetched,
the cache stays under its limit, faults are survived, a down server is a clear error, two ranks
share one download per shard, and SIGKILL + resume is exact."""
from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from data_pipeline.storage.cache import ShardCache
from tests.helpers import (
    PY,
    REPO,
    TINY,
    child_env,
    free_port,
    kill_all,
    logged_steps,
    losses,
    run_train,
    start_train,
    wait_for,
)
from tests.support.http_server import ShardServer
from train.checkpoint_layout import check_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STEPS = 16   # 16 steps x 128 tokens: a little over one epoch of the 44-shard corpus (1,810 tokens)


def args(urls, run_dir, steps=STEPS, *extra, mbs=4, every=100):
    return [*TINY, "data=webdataset", f"data.urls='{urls}'", "data.shuffle_buffer=8", "data.prefetch_shards=2",
            "data.retry_backoff_s=0.05", "schedule=constant", f"trainer.max_steps={steps}", f"run.dir={run_dir}",
            f"trainer.micro_batch_size={mbs}", f"checkpoint.every_steps={every}", *extra]


@pytest.fixture(scope="module")
def local_losses(remote_corpus, tmp_path_factory):
    shards, _ = remote_corpus
    run_dir = tmp_path_factory.mktemp("local")
    run_train(args(shards.root, run_dir))
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_a_full_epoch_from_http_keeps_the_cache_under_a_quarter_of_the_corpus(remote_corpus, local_losses, tmp_path):
    shards, server = remote_corpus
    corpus = sum(p.stat().st_size for p in shards.shard_paths)
    limit = corpus // 4
    cache = tmp_path / "cache"
    server.clear()
    peak = []
    proc = start_train(args(server.url + "/", tmp_path / "run", STEPS, f"data.cache_dir={cache}",
                            f"data.cache_limit={limit}"))
    while proc.poll() is None:   # sample the cache directory from outside, as du would
        if cache.is_dir():
            peak.append(ShardCache(str(cache), limit).used_bytes())
        time.sleep(0.005)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert "going over the limit" not in out
    assert losses(tmp_path / "run") == local_losses
    assert max(peak) <= limit, (max(peak), limit)
    fetched = server.fetched()
    assert set(fetched) == {f"train/{p.name}" for p in shards.shard_paths}   # the whole epoch was read ...
    assert len(fetched) * max(p.stat().st_size for p in shards.shard_paths) > 2 * limit   # ... through eviction
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "loss" in r][-1]["data_epoch"] >= 1


def test_five_steps_fetch_only_the_shards_they_need(remote_corpus, tmp_path):
    shards, server = remote_corpus
    server.clear()
    run_train(args(server.url + "/", tmp_path / "run", 5, "data.num_workers=0", f"data.cache_dir={tmp_path / 'c'}",
                   mbs=2))
    from data_pipeline.read.config import WebDatasetConfig
    from data_pipeline.read.loader import WebDatasetLoader

    plan = WebDatasetLoader(WebDatasetConfig(urls=str(shards.root), shuffle_buffer=8), rank=0, world_size=1,
                            micro_batch_size=2, seq_len=32)
    span = 64

    def needed(rounds):
        ids = [p.shard for k in range(rounds) for p in plan.order.pieces(k * span, span + 1)]
        return [f"train/{plan.table.names[s].rsplit('/', 1)[-1]}" for s in dict.fromkeys(ids)]

    fetched = server.fetched()
    assert len(fetched) == len(set(fetched))
    assert set(needed(5)) <= set(fetched) <= set(needed(40)[:len(needed(5)) + 2]), (fetched, needed(6))
    assert len(fetched) <= len(shards.shard_paths) // 3


def test_503_every_fourth_request_and_a_reset_mid_body_give_identical_losses(remote_corpus, local_losses, tmp_path):
    shards, _ = remote_corpus
    with ShardServer(shards.root, fail_every=4, reset_once=True) as server:
        run_train(args(server.url + "/", tmp_path / "run", STEPS, f"data.cache_dir={tmp_path / 'c'}"))
        statuses = collections.Counter(r.status for r in server.log)
        assert statuses[503] >= len(server.log) // 4 - 1 and statuses[206] >= 1   # the faults fired
    assert losses(tmp_path / "run") == local_losses


def test_a_down_server_is_a_clear_error_after_the_retries(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/corpus/"
    t0 = time.monotonic()
    proc = run_train(args(url, tmp_path / "run", 2, "data.retries=2"), check=False, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert f"unreachable: {url}manifest.json: no HTTP status" in err and "after 3 tries" in err
    assert "Traceback" not in err
    assert time.monotonic() - t0 < 60


def test_two_ranks_on_one_node_download_each_shard_once(remote_corpus, tmp_path):
    shards, server = remote_corpus
    server.clear()
    run_train(args(server.url + "/", tmp_path / "run", 8, f"data.cache_dir={tmp_path / 'c'}"), nproc=2)
    fetched = collections.Counter(server.fetched())
    assert len(fetched) >= 8 and set(fetched.values()) == {1}, fetched
    assert sum(r.path == "manifest.json" for r in server.log if r.method == "GET") == 2   # both ranks read it


def test_sigkill_then_resume_from_a_remote_corpus_is_exact(remote_corpus, local_losses, tmp_path):
    _, server = remote_corpus
    run_dir = tmp_path / "run"
    a = args(server.url + "/", run_dir, STEPS, f"data.cache_dir={tmp_path / 'c'}", every=5)
    proc = start_train(a)
    wait_for(lambda: logged_steps(run_dir) >= 8, proc=proc, what="step 8", timeout=200)
    kill_all(proc)
    assert 5 <= int((run_dir / "checkpoints" / "latest").read_text().split("_")[1]) < STEPS
    run_train(a)
    assert losses(run_dir) == local_losses


def test_prepare_to_s3_then_train_from_it_like_from_local_files(moto_s3, tmp_path):
    import boto3

    _, env = moto_s3
    boto3.client("s3").create_bucket(Bucket="prep")
    src = tmp_path / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    src.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % 12] for j in range(20 + i % 40))}) + "\n"
                           for i in range(300)))
    cmd = [PY, "-m", "data_pipeline.prepare", f"source.path={src}", "out=s3://prep/corpus/", "num_proc=1",
           "tokenizer.vocab_size=300", "shard.max_bytes=8192", "progress=false"]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="prep", Prefix="corpus/")["Contents"]]
    local = tmp_path / "local"
    for key in keys:   # boto3's own download, as the local twin
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("prep", key, str(local / key))
    manifest = json.loads((local / "corpus/manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 10
    run_train(args(str(local / "corpus"), tmp_path / "ref", 6), env=child_env(**env))
    run_train(args("s3://prep/corpus/", tmp_path / "s3", 6, f"data.cache_dir={tmp_path / 'c'}"), env=child_env(**env))
    assert losses(tmp_path / "s3") == losses(tmp_path / "ref")
    from data_pipeline.prepare import prepare
    from data_pipeline.prepare.config import load_prepare_config

    again = threading.Event()
    cfg = load_prepare_config({"source": {"path": str(src)}, "out": "s3://prep/corpus/", "num_proc": 1,
                               "tokenizer": {"vocab_size": 300}, "shard": {"max_bytes": 8192}, "progress": False})
    before = s3.head_object(Bucket="prep", Key="corpus/manifest.json")["LastModified"]
    assert prepare(cfg)["fingerprint"] == manifest["fingerprint"] and not again.is_set()
    assert s3.head_object(Bucket="prep", Key="corpus/manifest.json")["LastModified"] == before   # a no-op


def _snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run's complete checkpoints: what must survive untouched."""
    files = sorted(p for p in (run_dir / "checkpoints").glob("step_*/**/*") if p.is_file())
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _rank_lines(out: str) -> list[str]:
    """The ranks' own output: what comes before torchrun's agent reports the failure."""
    lines = out.splitlines()
    end = next((i for i, x in enumerate(lines) if "torch/distributed/elastic" in x), len(lines))
    return [x for x in lines[:end] if x.strip()]


def test_the_http_source_dies_mid_run_under_torchrun(remote_corpus, local_losses, tmp_path):
    """The server is stopped at step 4: every rank stops at one step, that step is checkpointed,
    the last line names URL, error, step and command; with the server back the same command
    resumes there and the curve is the uninterrupted one."""
    shards, _ = remote_corpus
    run_dir, cache = tmp_path / "run", tmp_path / "cache"

    server = ShardServer(shards.root, latency_s=0.15).__enter__()
    url, port = server.url + "/", server.port
    cmd = args(url, run_dir, STEPS, f"data.cache_dir={cache}", "data.retries=1", "trainer.global_batch_size=4",
               mbs=2, every=3)
    proc = start_train(cmd, nproc=2)
    wait_for(lambda: logged_steps(run_dir) >= 4, proc=proc, what="step 4", timeout=300)
    server.__exit__()
    before = _snapshot(run_dir)  # step 3's checkpoint
    text = (run_dir / "metrics.jsonl").read_text()
    early_metrics = text[:text.rfind("\n") + 1]  # the records so far (complete lines)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    last = _rank_lines(out)[-1]
    stopped = logged_steps(run_dir)
    assert 4 <= stopped < 16, out[-3000:]
    assert last.startswith("error: stopped before step"), out[-4000:]
    assert f"stopped before step {stopped + 1}: data source lost: {url}" in last and "no HTTP status" in last
    assert f"checkpointed step {stopped}" in last and "torch.distributed.run" in last and "-m train" in last
    assert f"traceback : {last[len('error: '):]}" in out  # torchrun's summary names it as the root cause
    assert "Traceback" not in "\n".join(_rank_lines(out))
    ckpt = run_dir / "checkpoints" / f"step_{stopped:08d}"
    assert check_checkpoint(ckpt) is None and json.loads((ckpt / "trainer_state.json").read_text())["finite"]
    after = _snapshot(run_dir)
    assert any("step_00000003" in k for k in before)
    assert all(after[k] == v for k, v in before.items() if "step_00000003" in k)  # untouched
    at_stop = (run_dir / "metrics.jsonl").read_text()
    assert at_stop.startswith(early_metrics) and '"step": %d, "loss"' % stopped in at_stop

    with ShardServer(shards.root, port=port):  # the source is back: the same command resumes
        done = run_train(cmd, nproc=2)
    assert f"resumed from {ckpt} at step {stopped}" in done.stderr + done.stdout
    assert (run_dir / "metrics.jsonl").read_text().startswith(at_stop)  # every record of the first attempt
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in local_losses.items():  # one rank on local files: the same global batches
        assert got[step] == pytest.approx(loss, rel=1e-5), (step, got, local_losses)
