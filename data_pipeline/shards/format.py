"""The on-disk sample format shared by `prepare`, the loader and `testing.make_shards`.

A shard is a plain tar file (`tar -tf` lists it, `webdataset.WebDataset` reads it). One
sample per document: a single member `<key>.u16` (or `<key>.u32`) holding the document's
token ids as a raw little-endian array that already ends with the EOS token. Any tar written
by `webdataset.TarWriter` with samples `{"__key__": key, "u16": ids.astype("<u2").tobytes()}`
follows this format. Members with other extensions are ignored by the loader.

Chat shards (`prepare mode=chat`) add one member per sample, `<key>.mask`: one uint8 per
token of `<key>.u16`/`.u32`, 1 where that token is a training target (an assistant token),
0 elsewhere. A shard has a mask for every sample or for none.

Next to each shard `prepare` writes `<shard>.idx.npy`: an (n + 1, 2) uint64 array whose rows
are (byte offset of document i's data in the tar, tokens before document i); the last row is
(tar size, shard tokens). Chat shards add a third column: the byte offset of document i's
mask data (last row: tar size). The loader uses it for random access (see `order.py`);
shards without it are indexed by scanning their tar headers.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.fsutil import file_sha256

TOKEN_EXTS = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
MASK_EXT = "mask"
INDEX_SUFFIX = ".idx.npy"


def ext_for_vocab(vocab_size: int) -> str:
    """`u16` for vocabularies up to 65,535 ids, `u32` above (docs/DESIGN.md "Data contracts")."""
    return "u16" if vocab_size <= 65535 else "u32"


class ShardFormatError(ValueError):
    """A shard that cannot be read as documented above (truncated, bad member, bad array)."""


@dataclass
class ScanResult:
    """Token members of one tar: data offsets, token counts, dtype; plus rejected samples."""

    offsets: np.ndarray
    tokens: np.ndarray
    ext: str
    bad_samples: list[str] = field(default_factory=list)
    mask_offsets: np.ndarray | None = None

    def index_array(self, size: int) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(self.tokens, dtype=np.int64)])
        cols = [np.append(self.offsets, size), cum]
        if self.mask_offsets is not None:
            cols.append(np.append(self.mask_offsets, size))
        return np.stack(cols, axis=1).astype(np.uint64)


def _pair_masks(keys: list[str], masks: dict[str, tuple[int, int]], tokens: list[int],
                path) -> np.ndarray | None:
    """Mask data offsets aligned with the token members; None for a shard without masks."""
    if not masks:
        return None
    out = []
    for k, n in zip(keys, tokens):
        if k not in masks:
            raise ShardFormatError(f"shard {path}: sample {k} has no .{MASK_EXT} member but others "
                                   "have; a chat shard needs one mask per sample")
        off, size = masks[k]
        if size != n:
            raise ShardFormatError(f"shard {path}: {k}.{MASK_EXT} has {size} bytes for {n} tokens "
                                   "(a mask has one byte per token)")
        out.append(off)
    return np.asarray(out, np.int64)


def scan_tar(path: str | Path) -> ScanResult:
    """Index a tar by its headers (no data read). Raises ShardFormatError when truncated.

    webdataset only streams tars sequentially; random access needs the member offsets,
    which `tarfile` gives, so the index is built here.
    """
    size = os.path.getsize(path)
    offsets, tokens, bad, exts, keys = [], [], [], set(), []
    masks: dict[str, tuple[int, int]] = {}
    end = 0
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                end = m.offset_data + ((m.size + 511) // 512) * 512
                if m.offset_data + m.size > size:
                    raise ShardFormatError(f"shard {path} is truncated: member {m.name} needs "
                                           f"{m.offset_data + m.size} bytes, file has {size}")
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                ext = base.split(".", 1)[1] if "." in base else ""
                key = m.name[:len(m.name) - len(ext) - 1]
                if ext == MASK_EXT:
                    masks[key] = (m.offset_data, m.size)
                if ext not in TOKEN_EXTS:
                    continue
                isz = TOKEN_EXTS[ext].itemsize
                if m.size == 0 or m.size % isz:
                    bad.append(f"{m.name} ({m.size} bytes is not a non-empty {ext} array)")
                    continue
                exts.add(ext)
                keys.append(key)
                offsets.append(m.offset_data)
                tokens.append(m.size // isz)
    except tarfile.TarError as e:
        raise ShardFormatError(f"shard {path} is truncated or not a readable tar ({e})") from e
    if size < end + 1024:
        raise ShardFormatError(f"shard {path} is truncated: no end-of-archive marker after "
                               f"byte {end} (file has {size} bytes)")
    if len(exts) > 1:
        raise ShardFormatError(f"shard {path} mixes token dtypes {sorted(exts)}; use one per shard")
    if not offsets:
        raise ShardFormatError(f"shard {path} has no .u16/.u32 token members")
    mask_offsets = _pair_masks(keys, masks, tokens, path)
    return ScanResult(np.asarray(offsets, np.int64), np.asarray(tokens, np.int64),
                      exts.pop(), bad, mask_offsets)


@dataclass
class ShardRecord:
    """One finished shard as the manifest lists it (paths relative to the output root)."""

    path: str
    index: str
    samples: int
    tokens: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Write documents into `dir/shard-%06d.tar` of about `max_bytes` each, with indexes.

    webdataset.ShardWriter rotates shards too, but cannot report per-shard sample and token
    counts nor write the random-access index, which the manifest needs; TarWriter does the tar.
    """

    def __init__(self, root: Path, subdir: str, ext: str, max_bytes: int) -> None:
        self.root, self.subdir, self.ext, self.max_bytes = Path(root), subdir, ext, max_bytes
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        self.records: list[ShardRecord] = []
        self._writer: wds.TarWriter | None = None
        self._bytes = self._samples = self._tokens = 0
        self.total_samples = 0

    def write(self, tokens: bytes | np.ndarray, mask: bytes | np.ndarray | None = None) -> None:
        """Append one document: its token ids in this writer's dtype (text: EOS included),
        and for chat data its target mask (one uint8 per token)."""
        data = tokens if isinstance(tokens, bytes) else \
            np.ascontiguousarray(tokens, dtype=TOKEN_EXTS[self.ext]).tobytes()
        sample = {self.ext: data}
        member = 512 + (len(data) + 511) // 512 * 512
        if mask is not None:
            sample[MASK_EXT] = mask if isinstance(mask, bytes) else np.asarray(mask, np.uint8).tobytes()
            assert len(sample[MASK_EXT]) * TOKEN_EXTS[self.ext].itemsize == len(data)
            member += 512 + (len(sample[MASK_EXT]) + 511) // 512 * 512
        if self._writer is not None and self._bytes + member > self.max_bytes:
            self.end_shard()
        if self._writer is None:
            name = self._path(len(self.records))
            self._writer = wds.TarWriter(str(self.root / name), mtime=0)
        self._writer.write({"__key__": f"{self.total_samples:012d}", **sample})
        self._bytes += member
        self._samples += 1
        self._tokens += len(data) // TOKEN_EXTS[self.ext].itemsize
        self.total_samples += 1

    def _path(self, i: int) -> str:
        return f"{self.subdir}/shard-{i:06d}.tar"

    def end_shard(self) -> None:
        """Finish the current shard now (the next document starts a new one)."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        rel = self._path(len(self.records))
        path = self.root / rel
        scan = scan_tar(path)
        assert len(scan.offsets) == self._samples and int(scan.tokens.sum()) == self._tokens
        size = path.stat().st_size
        np.save(self.root / (rel + INDEX_SUFFIX), scan.index_array(size))
        self.records.append(ShardRecord(rel, rel + INDEX_SUFFIX, self._samples, self._tokens,
                                        size, file_sha256(path)))
        self._bytes = self._samples = self._tokens = 0

    def close(self) -> list[ShardRecord]:
        self.end_shard()
        return self.records
