"""Fixtures shared by the test files; plain helpers live in tests/helpers."""
from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers import TINY, losses, run_train
from tests.support.slurm_cluster import session_cluster

TIERS = ("unit", "integration", "system")
SHARED_GROUPS = {
    # Files that share a session resource which must exist once: the launcher tests' reference
    # curve and the local SLURM clusters (one worker runs them all, one after the other).
    "launch-slurm": ("test_slurm.py", "test_slurm_multinode.py", "test_launch_multinode.py"),
}
"""Under pytest-xdist (`make test`: `-n 2 --dist loadfile`) every file runs on one worker, and so
do the files of each group here."""
RUN_FIRST = ("system", "integration", "unit")
"""Under pytest-xdist, the files are handed out in this tier order: the long, mostly waiting system
tests start first and the many short unit files fill the end."""


LONG_FIRST = ("test_plan_memory.py", "test_dpo_train.py", "test_export_strategies.py", "test_guard_resume.py",
              "test_lora.py", "test_guard_nan.py", "test_trainer_resume.py", "test_model_loading.py",
              "test_trainer_compile_async.py", "test_trainer_parity.py", "test_trainer_remote.py", "test_bench_dpo.py")
"""Within a tier, the files that take longest (measured on a fresh clone) are handed out first, so
that the end of the run is many short files spread over the workers rather than one long file
on one worker while the other waits."""


def pytest_configure(config):
    """The cyclic GC is off while the test files import torch, transformers and the engines (as in
    the trainer's start-up, train/__main__.py), and what they allocated is frozen out of it once
    they are collected: every test's full collections then scan only what the tests create. Not in
    pytest-xdist's controller, which collects nothing and runs the whole session."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("numprocesses", None):
        gc.disable()


def pytest_collection_finish(session):
    gc.freeze()
    gc.enable()


def pytest_collection_modifyitems(config, items):
    """Each test carries the marker of its tier folder: `-m unit`, `-m "not system"`, ..."""
    for item in items:
        parts = item.path.parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order in which the scheduler below hands files out
        rank = {tier: k for k, tier in enumerate(RUN_FIRST)}
        long = {name: k for k, name in enumerate(LONG_FIRST)}
        items.sort(key=lambda item: (next((rank[t] for t in RUN_FIRST if t in item.path.parts), len(rank)),
                                     long.get(item.path.name, len(long))))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the SHARED_GROUPS files as one unit, in RUN_FIRST order."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            name = path.rsplit("/", 1)[-1]
            return next((g for g, files in SHARED_GROUPS.items() if name in files), path)

    config.option.loadscopereorder = False  # keep the collection's (RUN_FIRST) order
    return GroupedFiles(config, log)


def shared_tmp(tmp_path_factory, name: str) -> Path:
    """A folder of this session that every pytest-xdist worker sees (the workers' base temp dirs
    are siblings); the base temp dir itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs shared by parity and resume tests, computed once per strategy on demand,
    and once per session across pytest-xdist workers (the first to ask trains, under a file lock)."""
    root = shared_tmp(tmp_path_factory, "reference")

    def get(strategy: str, nproc: int, extra: tuple[str, ...] = ()) -> dict[int, float]:
        name = f"{strategy}-{nproc}-{hashlib.sha1(repr(extra).encode()).hexdigest()[:12]}"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = root / f"{name}.json"
            if not result.exists():
                run_dir = root / name
                run_train([*TINY, f"strategy={strategy}", f"run.dir={run_dir}", *extra], nproc=nproc)
                result.write_text(json.dumps(losses(run_dir)))
        return {int(step): loss for step, loss in json.loads(result.read_text()).items()}

    return get


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM cluster on localhost for the session (tests/support/slurm_cluster.py)."""
    from tests.support.slurm_cluster import missing_reason, start_cluster

    yield from session_cluster(tmp_path_factory, missing_reason, start_cluster, "slurm")


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """Two SLURM nodes in network namespaces of their own, for the session (tests/support/slurm_netns.py)."""
    from tests.support.slurm_netns import netns_missing_reason, start_two_node_cluster

    yield from session_cluster(tmp_path_factory, netns_missing_reason, start_two_node_cluster, "slurm2")


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory) -> dict[int, float]:
    """The launcher tests' uninterrupted reference curve, run once per session (tests/support/slurm_runs.py)."""
    from tests.support.slurm_runs import reference_curve

    return reference_curve(tmp_path_factory.mktemp("launch-reference"))


@pytest.fixture(scope="session")
def remote_corpus(tmp_path_factory):
    """44 tiny shards of 4 documents (about 10 KB each) and their prepare-style manifest,
    served by one HTTP server for the whole session (tests that need faults start their own)."""
    from tests.support.data import make_shards
    from tests.support.http_server import ShardServer

    shards = make_shards(tmp_path_factory.mktemp("remote"), sizes=(4,) * 44, min_len=5, max_len=15,
                         vocab_size=256, content="random")
    with ShardServer(shards.root) as server:
        yield shards, server


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 endpoint (moto in server mode on 127.0.0.1); yields (endpoint, env for children).
    Credentials are dummies read through boto3's standard environment chain."""
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port, patched_environ

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        with patched_environ(env):
            yield env["AWS_ENDPOINT_URL"], env
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """Directory of a tiny Llama-3-style tokenizer (split pattern + byte-level BPE, special
    tokens, chat template with {% generation %} markers), built locally once per session."""
    from tests.support.data import build_llama3_tokenizer

    out = tmp_path_factory.mktemp("llama3_tokenizer")
    build_llama3_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory):
    """A tiny Llama saved with save_pretrained: the base that the adapter tests fine-tune."""
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("hf_base"), seed=7)

