"""Typed settings of the data group (`conf/data/*.yaml`).

`data_pipeline` imports nothing of `train`; the trainer's schema embeds these classes.
Each class has `validate()` returning a list of problems (key, value seen, fix) so that
the trainer can collect every config error into one message before any process starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyntheticDataConfig:
    """Deterministic token sequences for tests, the demo and benchmarks.

    The global sample order depends only on `seed` and the sample index, never on the
    world size, so runs on different numbers of ranks see the same global batches.
    """

    kind: str = "synthetic"
    vocab_size: int = 256
    """Number of distinct token ids produced."""
    seed: int = 1234
    """Seed of the sample generator (independent of `trainer.seed`)."""
    num_workers: int = 0
    """Accepted for symmetry with webdataset; synthetic data is generated in-process."""

    def validate(self) -> list[str]:
        problems = []
        if self.vocab_size < 8:
            problems.append(f"data.vocab_size={self.vocab_size}: must be >= 8")
        return problems


@dataclass
class WebDatasetConfig:
    """Streaming loader over tokenized WebDataset tar shards written by `data_pipeline.prepare`."""

    kind: str = "webdataset"
    urls: str = ""
    """Shard URLs: brace pattern, local path, file://, or pipe: (only with allow_pipe)."""
    val_urls: str = ""
    """Validation shard URLs; empty = the manifest's validation split next to `urls`."""
    manifest: str = ""
    """Path of manifest.json; empty = next to the shards."""
    allow_pipe: bool = False
    """Allow `pipe:` URLs, which run shell commands."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer (0 = no sample shuffle)."""
    seed: int = 1234
    """Seed of shard-order and sample shuffling."""
    on_error: str = "raise"
    """What a corrupt shard does: `raise` (stop, naming the shard) or `skip` (warn and count)."""
    verify: bool = False
    """Check every shard's sha256 against the manifest before reading it."""
    vocab_size: int | None = None
    """Filled from the manifest's tokenizer when null."""

    def validate(self) -> list[str]:
        problems = []
        if not self.urls:
            problems.append("data.urls is empty: set data.urls=PATH/shard-{000000..000009}.tar "
                            "(shards written by `python -m data_pipeline.prepare`)")
        if self.urls.startswith("pipe:") and not self.allow_pipe:
            problems.append(f"data.urls={self.urls!r} is a pipe: command; set data.allow_pipe=true "
                            "to allow it (it runs a shell command)")
        if self.on_error not in ("raise", "skip"):
            problems.append(f"data.on_error={self.on_error!r}: use 'raise' or 'skip'")
        if self.num_workers < 0:
            problems.append(f"data.num_workers={self.num_workers}: must be >= 0")
        return problems


DATA_CONFIGS = {"synthetic": SyntheticDataConfig, "webdataset": WebDatasetConfig}
