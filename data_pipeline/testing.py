"""Small real shard sets for tests (ours and the trainer's): `make_shards(tmp_path, ...)`.

The shards are written by the same writer as `prepare` (tar + index + manifest.json), so a
test exercises the real format. By default every token of document g is `g + 1` and the
document ends with EOS (id 0): a batch then tells exactly which documents it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST_NAME, build_manifest, write_index_bundle, write_json_atomic
from data_pipeline.shard_format import ShardWriter, ext_for_vocab

EOS = 0


@dataclass
class ShardSet:
    """What make_shards wrote: `root` is a prepare-style output (use it as data.urls)."""

    root: Path
    shard_paths: list[Path]
    val_paths: list[Path]
    docs: list[np.ndarray]
    val_docs: list[np.ndarray]
    vocab_size: int

    @property
    def urls(self) -> str:
        """The train shards as a brace pattern (another accepted data.urls form)."""
        n = len(self.shard_paths)
        return str(self.root / "train" / f"shard-{{000000..{n - 1:06d}}}.tar")

    @property
    def total_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def make_docs(count: int, *, first_id: int = 0, min_len: int = 3, max_len: int = 40,
              vocab_size: int = 1000, content: str = "id", seed: int = 0) -> list[np.ndarray]:
    """`count` documents ending in EOS; content `id` = doc g's tokens are all g+1, `random`."""
    rng = np.random.default_rng([seed, first_id])
    docs = []
    for g in range(first_id, first_id + count):
        n = int(rng.integers(min_len, max_len + 1))
        if content == "id":
            if g + 1 >= vocab_size:
                raise ValueError(f"content='id' needs vocab_size > {g + 1}")
            body = np.full(n - 1, g + 1, dtype=np.int64)
        else:
            body = rng.integers(1, vocab_size, n - 1)
        docs.append(np.append(body, EOS).astype(np.int64))
    return docs


def make_shards(tmp_path: Path, sizes: tuple[int, ...] = (7, 3, 12), *, val_sizes: tuple[int, ...] = (4,),
                min_len: int = 3, max_len: int = 40, vocab_size: int = 1000, content: str = "id",
                seed: int = 0, name: str = "shards") -> ShardSet:
    """Write train shards with `sizes[i]` documents each (uneven on purpose) and val shards.

    Returns a ShardSet; point `WebDatasetConfig(urls=str(s.root))` (or `s.urls`) at it.
    """
    root = Path(tmp_path) / name
    ext = ext_for_vocab(vocab_size)
    splits, all_docs = {}, {}
    next_id = 0
    for split, counts in (("train", sizes), ("val", val_sizes)):
        writer = ShardWriter(root, split, ext, max_bytes=1 << 40)
        docs = []
        for count in counts:
            shard_docs = make_docs(count, first_id=next_id, min_len=min_len, max_len=max_len,
                                   vocab_size=vocab_size, content=content, seed=seed)
            next_id += count
            for d in shard_docs:
                writer.write(d)
            writer.end_shard()
            docs.extend(shard_docs)
        splits[split] = writer.close()
        all_docs[split] = docs
    manifest = build_manifest(splits=splits, ext=ext, vocab_size=vocab_size, eos_token_id=EOS,
                              tokenizer=None, fingerprint=f"make_shards-{seed}",
                              settings={"sizes": list(sizes), "val_sizes": list(val_sizes)},
                              index_bundle=write_index_bundle(root, splits))
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return ShardSet(root, [root / r.path for r in splits["train"]],
                    [root / r.path for r in splits["val"]], all_docs["train"], all_docs["val"],
                    vocab_size)
