"""Honest token counts (issue 18): with `data.pack=false` chat rows are right-padded, and the
logged `tokens` count only the conversations' tokens, `trained_tokens` the labels != -100, and
`padding_frac` the rest; the twin: the same batches hold a lot of padding, so counting every
position (as before) would differ."""
from __future__ import annotations

import signal

import pytest

from tests.helpers import TINY, compose_train
from tests.support.data import prepare_chat, sample_conversations, write_jsonl

SEQ, ROWS, STEPS = 128, 2, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, llama3_tokenizer):
    root = tmp_path_factory.mktemp("chat")
    src = write_jsonl(root / "chats.jsonl", sample_conversations(24, seed=3, max_words=6))
    prepare_chat(root / "out", src, llama3_tokenizer, **{"chat.max_len": SEQ, "split.val_fraction": 0.0})
    return root / "out"


def overrides(corpus, run_dir) -> list[str]:
    return [*TINY, "data=webdataset", f"data.urls={corpus}", "data.pack=false", "data.num_workers=0",
            "data.shuffle_buffer=8", f"trainer.seq_len={SEQ}", f"trainer.micro_batch_size={ROWS}",
            f"trainer.max_steps={STEPS}", "checkpoint.at_end=false", "trainer.device=cpu", f"run.dir={run_dir}"]


def conversation_tokens(batch) -> int:
    """Tokens before each row's padding: one conversation per row, its end is where the position
    ids restart (tests/integration/test_data_chat.py checks that this is the padding)."""
    total = 0
    for pos in batch["position_ids"].tolist():
        total += next((i for i in range(1, len(pos)) if pos[i] == 0), len(pos))
    return total


def test_tokens_count_no_padding_with_pack_false(corpus, tmp_path):
    from data_pipeline import build_loader
    from train.config import load_config
    from train.loop import train
    from train.metrics import read_metrics

    raw = compose_train(overrides(corpus, tmp_path))
    cfg = load_config(raw, world_size=1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        train(cfg, raw)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    batches = iter(build_loader(cfg.data, rank=0, world_size=1, micro_batch_size=ROWS, seq_len=SEQ))
    real = trained = 0
    for step, record in enumerate(records, start=1):
        batch = next(batches)
        real += conversation_tokens(batch)
        trained += int((batch["labels"] != -100).sum())
        assert record["tokens"] == real and record["trained_tokens"] == trained, (step, record)
        assert record["padding_frac"] == pytest.approx(1 - conversation_tokens(batch) / (ROWS * SEQ))
        assert trained < real
    assert real < 0.8 * STEPS * ROWS * SEQ, "the twin: these rows are mostly padding"
