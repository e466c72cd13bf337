"""Per-document work of the tokenizer processes: decode, check, tokenize, pick the split.

Kept free of torch/datasets so that it is cheap in every process. `init` runs once per
process (ProcessPoolExecutor initializer, or in-process for num_proc=1).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

SKIP_REASONS = ("empty", "bad_utf8", "bad_json", "missing_field", "not_text", "binary")
BINARY_BAD_FRACTION = 0.3
"""A text payload with a NUL byte, or with more than this share of bytes that are not UTF-8, is a
binary file (an image, an archive, a model) that slipped into a text source: skipped, never trained on."""
PIECE_CHARS = 1 << 18
"""Documents longer than this are tokenized piece by piece: a tokenizer's Encoding costs hundreds of
bytes per token, so a 50 MB document in one call needed 7.7 GB."""
_CUT = re.compile(r"(?<=\S) (?=\S)")
RECORD_ERRORS = ("bad_json", "missing_field", "not_text")
_REASON_TEXT = {"bad_json": "is not valid JSON", "missing_field": "has no field {field!r}",
                "not_text": "has no text in {field!r} (null or not a string)"}


@dataclass
class Settings:
    """What every tokenizer process needs; picklable."""

    tokenizer_file: str
    eos_token_id: int
    dtype: str
    kinds: list[tuple[str, str]]   # per source: (kind, text_field)
    on_bad_utf8: str
    val_fraction: float
    split_seed: int


@dataclass
class Encoded:
    """Result of one task: documents in input order, and what was skipped or repaired."""

    docs: list[tuple] = field(default_factory=list)   # (is_val, tokens[, chat mask])
    tokens: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, where, source field)
    written: dict[int, int] = field(default_factory=dict)  # documents per source index
    replaced_utf8: int = 0
    pieced: int = 0
    """Documents longer than PIECE_CHARS, tokenized in pieces."""
    pieces_exact: bool = True
    """The tokenizer gives the same ids for a text cut at a single space as for the whole text."""
    truncated: int = 0             # chat: conversations cut to chat.max_len
    trained: int = 0               # chat: tokens marked as targets
    split: int = 0                 # chat: conversations trained in several samples (chat_masks.py)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # chat: (field left out, where)

    diverged: int = 0              # preference: prompt tokens not a prefix of prompt + completion


_state: dict = {}


def init(settings: Settings) -> None:
    from tokenizers import Tokenizer

    _state["settings"] = settings
    _state["tokenizer"] = tok = Tokenizer.from_file(settings.tokenizer_file)
    probe = "Cut a long text at one space between words:  runs\tof  blanks stay whole, 12345 x."
    _state["pieces_exact"] = tok.encode(probe, add_special_tokens=False).ids == [
        i for piece in pieces(probe, 12) for i in tok.encode(piece, add_special_tokens=False).ids]


def describe(reason: str, where: str, text_field: str) -> str:
    """Human text for a record error, naming file and line/row."""
    return f"{where}: record {_REASON_TEXT[reason].format(field=text_field)}"


def decode(payload: str | None, kind: str, text_field: str, on_bad_utf8: str) -> tuple[str | None, str | None, bool]:
    """(text, skip reason, utf8 replaced) for one record; see sources.py for payloads."""
    replaced = False
    if kind in ("raw_text", "raw_jsonl"):
        raw = payload.encode("latin-1")
        if b"\0" in raw:
            return None, "binary", False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace")
            if text.count("\ufffd") > BINARY_BAD_FRACTION * len(text):
                return None, "binary", False
            if on_bad_utf8 == "skip":
                return None, "bad_utf8", False
            replaced = True
        if kind == "raw_jsonl":
            if not text.strip():
                return None, "empty", replaced
            try:
                obj = json.loads(text)
            except ValueError:
                return None, "bad_json", replaced
            if not isinstance(obj, dict) or text_field not in obj:
                return None, "missing_field", replaced
            text = obj[text_field]
            if not isinstance(text, str):
                return None, "not_text", replaced
    elif payload is None:
        return None, "not_text", False
    else:
        text = payload
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
        if on_bad_utf8 == "skip":
            return None, "bad_utf8", replaced
        text, replaced = text.encode("utf-8", "replace").decode("utf-8"), True
    if not text.strip():
        return None, "empty", replaced
    return text, None, replaced


def is_val(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a salted hash of the text (duplicates land together)."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=(seed % 2**64).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < fraction * 2.0 ** 64


def encode(records: list[tuple[int, str | None, str]]) -> Encoded:
    """Tokenize one task's records (source index, payload, where); EOS appended."""
    s: Settings = _state["settings"]
    out = Encoded()
    texts = []
    for src, payload, where in records:
        kind, text_field = s.kinds[src]
        text, reason, replaced = decode(payload, kind, text_field, s.on_bad_utf8)
        out.replaced_utf8 += replaced
        if reason:
            out.skipped.append((reason, where, text_field))
        else:
            texts.append(text)
            out.written[src] = out.written.get(src, 0) + 1
    if not texts:
        return out
    for text, ids in zip(texts, _token_ids(texts, s.dtype, out)):
        doc = np.empty(len(ids) + 1, dtype=s.dtype)
        doc[:-1] = ids
        doc[-1] = s.eos_token_id
        out.docs.append((is_val(text, s.val_fraction, s.split_seed), doc.tobytes()))
        out.tokens += len(doc)
    return out


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most about `size` characters, each cut before a single space between
    two non-blank characters: byte-level and whitespace pre-tokenizers start a new word there, so
    the pieces' tokens are the whole text's. A blob with no such space is cut at `size`."""
    start = 0
    while len(text) - start > size:
        end = start + size
        window_start = max(start + 1, end - size // 2)
        cut = None
        for m in _CUT.finditer(text, window_start, end):
            cut = m.start()
        cut = cut or end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _token_ids(texts: list[str], dtype: str, out: Encoded) -> list[np.ndarray]:
    """Token ids of each text: short ones in one batch, long ones piece by piece (bounded memory)."""
    tok = _state["tokenizer"]
    ids: list[np.ndarray | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    for i, e in zip(short, tok.encode_batch([texts[i] for i in short], add_special_tokens=False)):
        ids[i] = np.asarray(e.ids, dtype=dtype)
    for i, text in enumerate(texts):
        if ids[i] is None:
            out.pieced += 1
            out.pieces_exact = _state["pieces_exact"]
            ids[i] = np.concatenate([np.asarray(tok.encode(p, add_special_tokens=False).ids, dtype=dtype)
                                     for p in pieces(text)])
    return ids
