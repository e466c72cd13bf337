"""Synthetic, learnable token streams whose global order is independent of the world size.

Sample `i` of a split is a pure function of (seed, split, i): a random affine recurrence
`x[t+1] = (a * x[t] + b) mod V` with per-sample (a, b) and a start token, so a model can
learn it and the loss falls. Rank `r` of `W` takes samples `i = k * W + r` in order, so the
samples consumed by all ranks together are 0, 1, 2, ... whatever W is.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from data_pipeline.read.config import SyntheticDataConfig

_SPLIT_OFFSET = {"train": 0, "val": 1 << 40}


def synthetic_sample(seed: int, index: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The `seq_len + 1` tokens of global sample `index`."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    a, b, x0 = torch.randint(1, vocab_size, (3,), generator=gen).tolist()
    out = torch.empty(seq_len + 1, dtype=torch.int64)
    x = x0
    for t in range(seq_len + 1):
        out[t] = x
        x = (a * x + b) % vocab_size
    return out


class SyntheticLoader:
    """Follows `data_pipeline.Loader`; state is the next global sample index."""

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
        indices = [self._next_global + k * w + self.rank for k in range(b)]
        self._next_global += b * w
        rows = torch.stack([synthetic_sample(self.cfg.seed, self._offset + i, self.seq_len,
                                             self.vocab_size) for i in indices])
        pos = torch.arange(self.seq_len, dtype=torch.int64).expand(b, -1).clone()
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
