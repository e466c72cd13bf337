"""Synthetic, learnable token streams whose global order is independent of the world size.

Sample `i` of a split is a pure function of (seed, split, i): a random affine recurrence
`x[t+1] = (a * x[t] + b) mod V` with per-sample (a, b) and a start token, so a model can
learn it and the loss falls. Rank `r` of `W` takes samples `i = k * W + r` in order, so the
samples consumed by all ranks together are 0, 1, 2, ... whatever W is.

A micro-batch is built with a few tensor operations (no Python loop over tokens): the loader runs
inside the timed step of benches, where a token-by-token loop cost 4 ms per 2048-token sample.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from data_pipeline.read.config import SyntheticDataConfig

_SPLIT_OFFSET = {"train": 0, "val": 1 << 40}


def _generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]


def affine_rows(gens: list[torch.Generator], length: int, vocab_size: int) -> torch.Tensor:
    """`length` tokens of each sample's recurrence, [len(gens), length] int64.

    Token t is f^t(x0) with f(x) = a x + b mod V, and f^t is itself affine, (A_t, B_t). The
    tables of (A_t, B_t) for t < L give those for t < 2L in one step (f^(L+s) = f^s o f^L), so
    log2(length) steps build them all. Exact in int64 for V < 3e9 (products stay below V^2 + V)."""
    a, b, x0 = torch.stack([torch.randint(1, vocab_size, (3,), generator=g) for g in gens]).unbind(1)
    A = torch.ones(len(gens), 1, dtype=torch.int64)          # f^0 = identity
    B = torch.zeros(len(gens), 1, dtype=torch.int64)
    AL, BL = a[:, None], b[:, None]                           # f^L for the current L = 1
    while A.size(1) < length:
        A, B = torch.cat([A, A * AL % vocab_size], 1), torch.cat([B, (A * BL + B) % vocab_size], 1)
        AL, BL = AL * AL % vocab_size, (AL * BL + BL) % vocab_size
    return (A[:, :length] * x0[:, None] + B[:, :length]) % vocab_size


def doc_positions(gens: list[torch.Generator], seq_len: int, doc_len: int) -> torch.Tensor:
    """Position ids of packed documents, [len(gens), seq_len]: 0, 1, ... restarting at every
    document start; lengths uniform in 1 .. 2 * doc_len - 1 (drawn after the recurrence's numbers,
    so the tokens do not depend on doc_len)."""
    t = torch.arange(seq_len)
    if doc_len <= 0:
        return t.expand(len(gens), -1).clone()
    lengths = torch.stack([torch.randint(1, 2 * doc_len, (seq_len,), generator=g) for g in gens])
    ends = lengths.cumsum(1)  # start of the next document
    starts = torch.zeros(len(gens), seq_len + 1, dtype=torch.int64)
    starts.scatter_(1, ends.clamp(max=seq_len), ends.clamp(max=seq_len))
    return t - starts[:, :seq_len].cummax(1).values


def synthetic_sample(seed: int, index: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The `seq_len + 1` tokens of global sample `index`."""
    return affine_rows(_generators(seed, [index]), seq_len + 1, vocab_size)[0]


class SyntheticLoader:
    """Follows `data_pipeline.Loader`; state is the next global sample index."""

    reads_storage = False
    """Generated in memory: no source to lose (train/data_loss.py skips its per-step agreement)."""

    def __init__(self, cfg: SyntheticDataConfig, *, rank: int, world_size: int,
                 micro_batch_size: int, seq_len: int, split: str = "train") -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.vocab_size = cfg.vocab_size
        self.tokenizer_dir = None
        self._offset = _SPLIT_OFFSET[split]
        self._next_global = 0  # first global sample index of the next micro-batch round

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self._batch()

    def _batch(self) -> dict[str, torch.Tensor]:
        b, w = self.micro_batch_size, self.world_size
        indices = [self._offset + self._next_global + k * w + self.rank for k in range(b)]
        self._next_global += b * w
        gens = _generators(self.cfg.seed, indices)
        rows = affine_rows(gens, self.seq_len + 1, self.vocab_size)
        pos = doc_positions(gens, self.seq_len, self.cfg.doc_len)
        return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                "position_ids": pos}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "next_global": self._next_global, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next_global = int(state["next_global"])

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        # Every rank of the old run holds the same global position.
        self._next_global = int(states[0]["next_global"])

    def metrics(self) -> dict[str, float]:
        return {}
