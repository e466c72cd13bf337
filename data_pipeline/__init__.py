"""Corpus preparation (`python -m data_pipeline.prepare`) and the streaming loaders.

The trainer only calls `build_loader`; every loader follows the `Loader` protocol below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol

from data_pipeline.read.config import SyntheticDataConfig, WebDatasetConfig

if TYPE_CHECKING:  # torch is not imported here, so `python -m launch` stays quick
    import torch


class Loader(Protocol):
    """An endless (multi-epoch) iterator of packed micro-batches for one rank.

    Each batch is a dict of int64 tensors of shape [micro_batch_size, seq_len]:
    `input_ids`, `labels` (already shifted: labels[t] is the token after input_ids[t];
    -100 = ignored; chat shards: -100 wherever the next token is not a target) and
    `position_ids` (restart at 0 at every document boundary). See batches.py.
    """

    vocab_size: int
    tokenizer_dir: str | None

    def __iter__(self) -> Iterator[dict[str, "torch.Tensor"]]: ...

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out; loadable with torch.load(weights_only=True)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which `state` was taken (same world size)."""

    def load_elastic(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every rank of a run with a different world size."""

    def metrics(self) -> dict[str, float]:
        """Counters for metrics.jsonl (e.g. skipped shards; `data/tokens/<source>` of a data.mix)."""

    def epoch_units(self, epochs: float) -> tuple[int, str, str]:
        """(stream units, `tokens` or `rows`, how they were counted) that `epochs` passes over the
        data cover; train/epochs.py turns them into steps (not for synthetic data, which has no epochs)."""


def build_loader(cfg: SyntheticDataConfig | WebDatasetConfig, *, rank: int, world_size: int,
                 micro_batch_size: int, seq_len: int, split: str = "train",
                 pin_memory: bool = False) -> Loader:
    """Build the loader for `cfg.kind` for one rank; `split` is `train` or `val`."""
    if cfg.kind == "synthetic":
        from data_pipeline.read.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, rank=rank, world_size=world_size,
                               micro_batch_size=micro_batch_size, seq_len=seq_len, split=split)
    if cfg.kind == "webdataset" and cfg.mix:
        from data_pipeline.read.mix import MixLoader

        return MixLoader(cfg, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                         seq_len=seq_len, split=split, pin_memory=pin_memory)
    if cfg.kind == "webdataset":
        from data_pipeline.read.loader import WebDatasetLoader

        return WebDatasetLoader(cfg, rank=rank, world_size=world_size,
                                micro_batch_size=micro_batch_size, seq_len=seq_len, split=split,
                                pin_memory=pin_memory)
    raise ValueError(f"data.kind={cfg.kind!r}: use data=synthetic or data=webdataset")


__all__ = ["Loader", "SyntheticDataConfig", "WebDatasetConfig", "build_loader"]
