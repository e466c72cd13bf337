"""Per-document work of the tokenizer processes: decode, check, tokenize, pick the split.

Kept free of torch/datasets so that it is cheap in every process. `init` runs once per
process (ProcessPoolExecutor initializer, or in-process for num_proc=1).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

SKIP_REASONS = ("empty", "bad_utf8", "bad_json", "missing_field", "not_text")
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
    replaced_utf8: int = 0
    truncated: int = 0             # chat: conversations cut to chat.max_len
    trained: int = 0               # chat: tokens marked as targets


_state: dict = {}


def init(settings: Settings) -> None:
    from tokenizers import Tokenizer

    _state["settings"] = settings
    _state["tokenizer"] = Tokenizer.from_file(settings.tokenizer_file)


def describe(reason: str, where: str, text_field: str) -> str:
    """Human text for a record error, naming file and line/row."""
    return f"{where}: record {_REASON_TEXT[reason].format(field=text_field)}"


def decode(payload: str | None, kind: str, text_field: str, on_bad_utf8: str) -> tuple[str | None, str | None, bool]:
    """(text, skip reason, utf8 replaced) for one record; see sources.py for payloads."""
    replaced = False
    if kind in ("raw_text", "raw_jsonl"):
        raw = payload.encode("latin-1")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if on_bad_utf8 == "skip":
                return None, "bad_utf8", False
            text, replaced = raw.decode("utf-8", "replace"), True
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
    if not texts:
        return out
    encodings = _state["tokenizer"].encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, encodings):
        ids = np.empty(len(enc.ids) + 1, dtype=s.dtype)
        ids[:-1] = enc.ids
        ids[-1] = s.eos_token_id
        out.docs.append((is_val(text, s.val_fraction, s.split_seed), ids.tobytes()))
        out.tokens += len(ids)
    return out
