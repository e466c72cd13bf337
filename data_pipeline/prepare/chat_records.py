"""Chat / instruction records -> a checked list of messages (`mode=chat` of prepare).

Three record shapes are accepted, tried in this order:

- OpenAI-style: `record[chat.messages_field]` is a list of `{role, content}`;
- prompt/completion pairs: `record[chat.prompt_field]` and `record[chat.completion_field]`;
- instruction data: `record[chat.output_field]` and the first of `chat.instruction_fields`
  (the non-empty instruction fields, joined by a blank line, form the user turn; an optional
  `chat.system_field` becomes a system turn).

A record that breaks a rule gives a reason code (counted in the closing report, or raised
with file and line under on_bad_record=raise) and a human sentence naming what was wrong.
Kept free of torch and transformers: it runs in every tokenizer process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CHAT_RECORD_ERRORS = ("bad_json", "missing_field", "bad_messages", "unknown_role", "not_text",
                      "empty_assistant")


@dataclass
class RecordFields:
    """Field names of the record shapes (a picklable copy of the chat settings)."""

    messages_field: str
    prompt_field: str
    completion_field: str
    instruction_fields: list[str]
    output_field: str
    system_field: str | None

    def shapes(self) -> str:
        return (f"{self.messages_field!r}, {self.prompt_field!r}+{self.completion_field!r}, or "
                f"{self.instruction_fields[0]!r}+{self.output_field!r}")


class BadRecord(ValueError):
    """A record that cannot become a conversation: `reason` is its report counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_payload(payload: str | None, kind: str, on_bad_utf8: str) -> tuple[Any, bool]:
    """(JSON object, utf-8 replaced) of one source record; raises BadRecord.

    `raw_jsonl` payloads are a JSONL line as latin-1 text (see sources.py); other payloads
    are a whole Parquet/Arrow row already dumped to JSON by sources.py.
    """
    replaced = False
    if payload is None:
        raise BadRecord("missing_field", "record is null")
    text = payload
    if kind == "raw_jsonl":
        raw = payload.encode("latin-1")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if on_bad_utf8 == "skip":
                raise BadRecord("bad_utf8", "record is not valid UTF-8") from None
            text, replaced = raw.decode("utf-8", "replace"), True
        if not text.strip():
            raise BadRecord("empty", "empty line")
    try:
        return json.loads(text), replaced
    except ValueError:
        raise BadRecord("bad_json", "record is not valid JSON") from None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("not_text", f"{what} is {type(value).__name__}, not a string")
    return value


def _from_messages(raw: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRecord("bad_messages", f"field {field!r} is not a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("bad_messages", f"{field}[{i}] is not an object with role and content")
        role = m["role"]
        if role not in ROLES:
            raise BadRecord("unknown_role", f"{field}[{i}] has unknown role {role!r} "
                            f"(use one of {', '.join(ROLES)})")
        msg = {"role": role, "content": _text(m["content"], f"{field}[{i}].content")}
        out.append(msg)
    return out


def _from_instruction(rec: dict, f: RecordFields) -> list[dict[str, str]]:
    parts = [_text(rec[k], f"field {k!r}") for k in f.instruction_fields
             if k in rec and rec[k] is not None]
    user = "\n\n".join(p for p in parts if p.strip())
    msgs = []
    if f.system_field and rec.get(f.system_field) is not None:
        msgs.append({"role": "system", "content": _text(rec[f.system_field], f"field {f.system_field!r}")})
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": _text(rec[f.output_field], f"field {f.output_field!r}")})
    return msgs


def to_messages(rec: Any, f: RecordFields) -> list[dict[str, str]]:
    """The record's conversation, checked; raises BadRecord naming what is wrong."""
    if not isinstance(rec, dict):
        raise BadRecord("missing_field", f"record is a {type(rec).__name__}, not an object with "
                        f"{f.shapes()}")
    if f.messages_field in rec:
        msgs = _from_messages(rec[f.messages_field], f.messages_field)
    elif f.prompt_field in rec and f.completion_field in rec:
        msgs = [{"role": "user", "content": _text(rec[f.prompt_field], f"field {f.prompt_field!r}")},
                {"role": "assistant",
                 "content": _text(rec[f.completion_field], f"field {f.completion_field!r}")}]
    elif f.output_field in rec and f.instruction_fields[0] in rec:
        msgs = _from_instruction(rec, f)
    else:
        raise BadRecord("missing_field", f"record has none of the fields {f.shapes()} "
                        f"(it has {sorted(rec)[:8]}); set chat.messages_field or the chat field map")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord("empty_assistant", f"assistant turn {i} is empty")
    return msgs


def message_texts(rec: Any, f: RecordFields) -> list[str]:
    """The contents of a record's messages (for training a tokenizer); [] when unusable."""
    try:
        return [m["content"] for m in to_messages(rec, f)]
    except BadRecord:
        return []
