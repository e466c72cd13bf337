"""Find and read corpus sources through the `datasets` library.

Each source yields records `(payload, where)`: `where` names the file and line/row for error
messages; `payload` is what a tokenizer process decodes (encode.py). Text and JSONL files are
read with encoding latin-1, which maps every byte to one character and back losslessly, so
that invalid UTF-8 can be detected, counted and replaced or skipped per document instead of
failing the whole file inside `datasets`. JSON is parsed per line in the tokenizer processes,
where a bad line can be skipped and reported with its file and line number (the `datasets`
JSON builder parses whole blocks with pyarrow and can do neither). A UTF-8 byte-order mark at the
start of a text or JSONL file is not part of its text.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_pipeline.prepare.config import MixConfig, SourceConfig

STDLIB_DEFAULT_FILES = 300
_BOM = "\xef\xbb\xbf"
"""The UTF-8 byte-order mark as latin-1 text: dropped from the start of a text or JSONL file (an
editor's BOM made the first JSONL record "bad JSON")."""
_EXT_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass
class Source:
    """A resolved source: its format, the files read (in order) and how to read them."""

    label: str
    format: str
    files: list[str]
    text_field: str
    weight: float
    split: str | None = None
    records: bool = False
    """Yield whole records (mode=chat): Parquet/Arrow rows dumped to JSON, not one field."""

    @property
    def kind(self) -> str:
        """How tokenizer processes decode a payload: raw text, raw JSONL line, or a value."""
        return {"text": "raw_text", "jsonl": "raw_jsonl"}.get(self.format, "value")


def _spaced(files: list[str], n: int | None) -> list[str]:
    if n is None or n >= len(files):
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def _walk(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in
                                 ("dataset_dict.json", "state.json", "dataset_info.json"))


def resolve_source(cfg: SourceConfig, key: str = "source") -> Source:
    """Turn a source setting into a concrete file list and format; errors name `key`."""
    if cfg.path == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [f for f in _walk(root, skip=("site-packages", "dist-packages", "__pycache__"))
                 if f.endswith(".py")]
        n = cfg.max_files if cfg.max_files is not None else STDLIB_DEFAULT_FILES
        return Source(f"stdlib:{root}", "text", _spaced(files, n), cfg.text_field, cfg.weight)
    path = Path(cfg.path)
    if glob.has_magic(cfg.path):
        files = sorted(f for f in glob.glob(cfg.path, recursive=True) if os.path.isfile(f))
    elif _is_saved_dataset(path):
        if cfg.format not in (None, "arrow"):
            raise ValueError(f"{key}.path={cfg.path!r} is a datasets.save_to_disk directory; "
                             f"{key}.format={cfg.format!r} does not fit (use arrow or null)")
        return Source(str(path), "arrow", [str(path)], cfg.text_field, cfg.weight, cfg.split)
    elif path.is_dir():
        files = _walk(path)
    elif path.is_file():
        files = [str(path)]
    else:
        raise ValueError(f"{key}.path={cfg.path!r} does not exist")
    files = _spaced(files, cfg.max_files)
    if not files:
        raise ValueError(f"{key}.path={cfg.path!r} holds no files")
    fmt = cfg.format or _infer(files, key)
    return Source(cfg.path, fmt, files, cfg.text_field, cfg.weight, cfg.split)


def _infer(files: list[str], key: str) -> str:
    found = {_EXT_FORMAT.get(Path(f).suffix.lower(), "text") for f in files}
    if len(found) > 1:
        raise ValueError(f"{key}.path mixes file kinds {sorted(found)}: set {key}.format "
                         f"(one of text, jsonl, parquet) or point it at one kind")
    return found.pop()


def mark_records(sources: list[Source], keys: list[str], mode: str, what: str) -> None:
    """mode=chat and mode=preference read whole records (`what`); plain-text sources have none."""
    for s, k in zip(sources, keys):
        if s.format == "text":
            raise ValueError(f"{k}.path={s.label!r} is plain text, but mode={mode} reads records: "
                             f"point it at JSONL, Parquet or a datasets.save_to_disk directory of {what}")
        s.records = True


def check_source(src: Source, key: str = "source") -> None:
    """Schema checks that need no full read (missing columns, splits): fail before any work.
    Chat sources (whole records) are checked per record instead (chat_records.py)."""
    if src.records:
        if src.format == "arrow":
            _load_saved(src, key)
        return
    if src.format == "parquet":
        import pyarrow.parquet as pq

        for f in src.files:
            names = pq.read_schema(f).names
            if src.text_field not in names:
                raise ValueError(f"{f} has no column {src.text_field!r} (columns: {names}); "
                                 f"set {key}.text_field")
    elif src.format == "arrow":
        ds = _load_saved(src, key)
        if src.text_field not in ds.column_names:
            raise ValueError(f"{src.files[0]} has no column {src.text_field!r} (columns: "
                             f"{ds.column_names}); set {key}.text_field")


def _load_saved(src: Source, key: str):
    import datasets

    ds = datasets.load_from_disk(src.files[0])
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or ("train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None))
        if split not in ds:
            raise ValueError(f"{src.files[0]} is a DatasetDict with splits {list(ds)}: set {key}.split")
        ds = ds[split]
    return ds


def iter_source(src: Source) -> Iterator[tuple[str | None, str]]:
    """Records of one source in a fixed order: (payload, where)."""
    import datasets

    if src.format == "arrow":
        ds = _load_saved(src, "source")
        if src.records:
            for row, rec in enumerate(ds):
                yield _dump(rec), f"{src.files[0]} row {row}"
            return
        ds = ds.select_columns([src.text_field])
        row = 0
        for batch in ds.iter(batch_size=1000):
            for value in batch[src.text_field]:
                yield (value if isinstance(value, str) else None), f"{src.files[0]} row {row}"
                row += 1
        return
    if src.format == "text":
        ds = datasets.load_dataset("text", data_files=src.files, sample_by="document",
                                   encoding="latin-1", split="train", streaming=True)
        n = 0
        for n, (row, f) in enumerate(zip(ds, src.files), 1):
            yield _no_bom(row["text"]), f
        assert n == len(src.files), f"datasets returned {n} documents for {len(src.files)} files"
        return
    if src.format == "jsonl":
        ds = datasets.load_dataset("text", data_files=src.files, encoding="latin-1",
                                   split="train", streaming=True)
    else:
        ds = datasets.load_dataset("parquet", data_files=src.files,
                                   columns=None if src.records else [src.text_field],
                                   split="train", streaming=True)
    if ds.n_shards != len(src.files):
        raise RuntimeError(f"datasets split {len(src.files)} files into {ds.n_shards} shards")
    for i, f in enumerate(src.files):
        part = ds.shard(num_shards=ds.n_shards, index=i, contiguous=True)
        if src.format == "jsonl":
            for line, row in enumerate(part, 1):
                yield (_no_bom(row["text"]) if line == 1 else row["text"]), f"{f}:{line}"
        else:
            for r, row in enumerate(part):
                if src.records:
                    yield _dump(row), f"{f} row {r}"
                    continue
                value = row[src.text_field]
                yield (value if isinstance(value, str) else None), f"{f} row {r}"


def _no_bom(text: str | None) -> str | None:
    return text[len(_BOM):] if text and text.startswith(_BOM) else text


def _dump(row: dict) -> str:
    """A Parquet/Arrow row as the JSON text a chat tokenizer process parses (chat_records.py)."""
    return json.dumps(row, ensure_ascii=False, default=str)


def _gen(src: Source, index: int) -> Iterator[dict]:
    for payload, where in iter_source(src):
        yield {"src": index, "payload": payload, "where": where}


def iter_mixed(sources: list[Source], mix: MixConfig) -> Iterator[tuple[int, str | None, str]]:
    """(source index, payload, where) over all sources; several are mixed by weight with
    datasets.interleave_datasets (the weights are the probabilities of drawing from each)."""
    if len(sources) == 1:
        for payload, where in iter_source(sources[0]):
            yield 0, payload, where
        return
    import datasets

    feats = datasets.Features({"src": datasets.Value("int32"), "payload": datasets.Value("string"),
                               "where": datasets.Value("string")})
    parts = [datasets.IterableDataset.from_generator(_gen, features=feats,
                                                     gen_kwargs={"src": s, "index": i})
             for i, s in enumerate(sources)]
    total = sum(s.weight for s in sources)
    mixed = datasets.interleave_datasets(parts, probabilities=[s.weight / total for s in sources],
                                         seed=mix.seed, stopping_strategy=mix.stopping_strategy)
    for row in mixed:
        yield row["src"], row["payload"], row["where"]


def source_fingerprint(src: Source) -> dict:
    """What identifies a source's content cheaply: files with size and mtime (like make)."""
    files = []
    for f in src.files:
        paths = _walk(Path(f)) if os.path.isdir(f) else [f]
        for p in paths:
            st = os.stat(p)
            files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return {"format": src.format, "text_field": src.text_field, "weight": src.weight,
            "split": src.split, "files": files}
