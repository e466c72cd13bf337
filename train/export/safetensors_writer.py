"""Write sharded safetensors files one tensor at a time (plus model.safetensors.index.json).

`safetensors.torch.save_file` needs every tensor of a file in memory at once; an export from a
sharded checkpoint must never hold the whole model (nor a 2 GB shard of it). The format is
simple and fully specified by its header (shapes and dtypes are known before any data is
read), so the header is computed up front and each tensor is streamed in after it. Files are
read back by the `safetensors` library itself (transformers' loader and verification).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class TensorSpec:
    """One tensor as it will be written: its export name, shape and output dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor bigger than max_bytes gets a file of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(specs: list[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, specs: list[TensorSpec], fetch: Callable[[str], torch.Tensor]) -> str:
    """Write one safetensors file; `fetch(name)` returns the tensor already in its output dtype.

    Returns the file's sha256, computed while writing (no second read of a multi-GB file).
    """
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        header = _header(specs)
        f.write(header)
        digest.update(header)
        for spec in specs:
            tensor = fetch(spec.name)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise AssertionError(f"{spec.name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"planned {spec.shape} {spec.dtype}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            digest.update(memoryview(data))
            del tensor, data
    return digest.hexdigest()


def write_sharded(out_dir: Path, specs: list[TensorSpec], max_bytes: int,
                  fetch: Callable[[str], torch.Tensor]) -> dict[str, str]:
    """Write every shard and the index (always, even for one shard); returns {shard file: sha256}."""
    shards = plan_shards(specs, max_bytes)
    names = shard_names(len(shards))
    weight_map, digests = {}, {}
    for name, shard in zip(names, shards):
        digests[name] = write_shard(out_dir / name, shard, fetch)
        weight_map.update({spec.name: name for spec in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return digests
