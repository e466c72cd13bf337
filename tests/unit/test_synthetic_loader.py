"""The vectorized synthetic loader gives the same batches as the token-by-token original (kept here as
the oracle), and its packed-document option restarts position ids without changing the tokens."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.read.config import SyntheticDataConfig
from data_pipeline.read.synthetic import SyntheticLoader


def old_sample(seed: int, index: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The original implementation (before the loader was vectorized), verbatim."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    a, b, x0 = torch.randint(1, vocab_size, (3,), generator=gen).tolist()
    out = torch.empty(seq_len + 1, dtype=torch.int64)
    x = x0
    for t in range(seq_len + 1):
        out[t] = x
        x = (a * x + b) % vocab_size
    return out


def old_batches(cfg, rank, world, micro, seq_len, split, n):
    offset = {"train": 0, "val": 1 << 40}[split]
    nxt = 0
    for _ in range(n):
        indices = [nxt + k * world + rank for k in range(micro)]
        nxt += micro * world
        rows = torch.stack([old_sample(cfg.seed, offset + i, seq_len, cfg.vocab_size) for i in indices])
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:],
               "position_ids": torch.arange(seq_len).expand(micro, -1)}


@pytest.mark.parametrize("vocab,seq_len,micro,rank,world,split", [
    (256, 64, 2, 0, 1, "train"), (8, 7, 3, 1, 2, "train"), (128256, 300, 2, 2, 3, "val"), (50257, 1, 1, 0, 1, "train"),
    (4_000_000, 129, 2, 0, 1, "train")])
def test_vectorized_loader_equals_the_original(vocab, seq_len, micro, rank, world, split):
    cfg = SyntheticDataConfig(vocab_size=vocab, seed=7)
    new = iter(SyntheticLoader(cfg, rank=rank, world_size=world, micro_batch_size=micro, seq_len=seq_len, split=split))
    for want in old_batches(cfg, rank, world, micro, seq_len, split, 3):
        got = next(new)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_packed_documents_restart_position_ids_and_keep_the_tokens():
    plain = next(iter(SyntheticLoader(SyntheticDataConfig(), rank=0, world_size=1, micro_batch_size=4, seq_len=512)))
    packed = next(iter(SyntheticLoader(SyntheticDataConfig(doc_len=32), rank=0, world_size=1, micro_batch_size=4,
                                       seq_len=512)))
    assert torch.equal(plain["input_ids"], packed["input_ids"]) and torch.equal(plain["labels"], packed["labels"])
    pos = packed["position_ids"]
    assert (pos[:, 0] == 0).all()
    step = pos[:, 1:] - pos[:, :-1]
    restarts = pos[:, 1:] == 0
    assert ((step == 1) | restarts).all()  # each position either continues its document or starts one
    docs = restarts.sum().item() + 4
    assert 40 < docs < 100  # 2048 tokens in documents of mean length 32: about 64
    assert not torch.equal(pos[0], pos[1])  # lengths differ per row
