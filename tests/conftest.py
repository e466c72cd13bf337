"""Fixtures shared by the test files; plain helpers live in tests/helpers."""
from __future__ import annotations

import pytest

from tests.helpers import TINY, losses, run_train


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs shared by parity and resume tests, computed once per strategy on demand."""
    cache: dict[tuple, dict[int, float]] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(strategy: str, nproc: int, extra: tuple[str, ...] = ()) -> dict[int, float]:
        key = (strategy, nproc, extra)
        if key not in cache:
            run_dir = root / f"{strategy}-{nproc}-{abs(hash(extra))}"
            run_train([*TINY, f"strategy={strategy}", f"run.dir={run_dir}", *extra], nproc=nproc)
            cache[key] = losses(run_dir)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def remote_corpus(tmp_path_factory):
    """44 tiny shards of 4 documents (about 10 KB each) and their prepare-style manifest,
    served by one HTTP server for the whole session (tests that need faults start their own)."""
    from data_pipeline.http_server import ShardServer
    from data_pipeline.testing import make_shards

    shards = make_shards(tmp_path_factory.mktemp("remote"), sizes=(4,) * 44, min_len=5, max_len=15,
                         vocab_size=256, content="random")
    with ShardServer(shards.root) as server:
        yield shards, server


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 endpoint (moto in server mode on 127.0.0.1); yields (endpoint, env for children).
    Credentials are dummies read through boto3's standard environment chain."""
    import os

    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"], env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """Directory of a tiny Llama-3-style tokenizer (split pattern + byte-level BPE, special
    tokens, chat template with {% generation %} markers), built locally once per session."""
    from data_pipeline.testing import build_llama3_tokenizer

    out = tmp_path_factory.mktemp("llama3_tokenizer")
    build_llama3_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory):
    """A tiny Llama saved with save_pretrained: the base that the adapter tests fine-tune."""
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("hf_base"), seed=7)
