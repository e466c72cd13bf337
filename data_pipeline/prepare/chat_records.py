"""Chat / instruction records -> a checked conversation (`mode=chat` of prepare).

Four record shapes, detected per record (`chat.format=auto`, tried in this order) or forced:

- `messages`: OpenAI-style `record[chat.messages_field]`, a list of `{role, content}`; assistant
  turns may carry `tool_calls` (content may then be null), `tool` turns `tool_call_id`/`name`;
- `sharegpt`: `record[chat.conversations_field]`, a list of `{from, value}` (from: system, human,
  gpt, also user/assistant; tool/observation are tool replies, function_call an assistant tool call);
- `prompt_completion`: `record[chat.prompt_field]` and `record[chat.completion_field]`;
- `instruction`: `record[chat.output_field]` and the first of `chat.instruction_fields` (joined by a
  blank line into the user turn; an optional `chat.system_field` becomes a system turn).

A record-level `chat.tools_field` list (JSON schemas, or a JSON string of them) goes to the template
as `tools`. Message fields the template is not given are counted (`ignored_fields`), never silent.
A record that breaks a rule gives a reason code (counted in the closing report, or raised with file
and line under on_bad_record=raise) and a human sentence naming what was wrong.
Kept free of torch and transformers: it runs in every tokenizer process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "sharegpt", "prompt_completion", "instruction")
CHAT_RECORD_ERRORS = ("bad_json", "missing_field", "bad_messages", "unknown_role", "not_text",
                      "empty_assistant", "history_changed")
"""Reasons that on_bad_record=raise turns into an error naming file and line."""
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool",
                  "function_call": "assistant"}
"""ShareGPT `from` values -> roles (`function_call` turns become assistant `tool_calls`)."""
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")
"""Message fields passed to the template; any other is dropped and counted as ignored."""


@dataclass
class RecordFields:
    """Field names of the record shapes (a picklable copy of the chat settings)."""

    messages_field: str
    prompt_field: str
    completion_field: str
    instruction_fields: list[str]
    output_field: str
    system_field: str | None
    format: str = "auto"
    conversations_field: str = "conversations"
    tools_field: str = "tools"
    role_map: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> str:
        return (f"{self.messages_field!r}, {self.conversations_field!r}, {self.prompt_field!r}+"
                f"{self.completion_field!r}, or {self.instruction_fields[0]!r}+{self.output_field!r}")


@dataclass
class Conversation:
    """A checked conversation: messages for the template, its tools, fields left out."""

    messages: list[dict[str, Any]]
    tools: list[dict] | None = None
    ignored: list[str] = field(default_factory=list)

    def key(self) -> str:
        """The text the validation split hashes (identical for the same conversation in any format)."""
        return json.dumps({"messages": self.messages, "tools": self.tools} if self.tools else self.messages,
                          sort_keys=True, ensure_ascii=False)

    @property
    def has_tools(self) -> bool:
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.messages)


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


def _json_value(value: Any, what: str) -> Any:
    """A value that datasets often store as a JSON string (tools, call arguments), parsed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise BadRecord("bad_messages", f"{what} is a string that is not JSON") from None
    return value


def _tool_call(call: Any, what: str) -> dict:
    """An OpenAI tool call as templates read it: {type, function: {name, arguments: object}}
    (arguments given as a JSON string are parsed: tool-aware templates render them with tojson)."""
    if isinstance(call, dict) and "function" not in call and "name" in call:
        call = {"type": "function", "function": call}   # ShareGPT function_call: {name, arguments}
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRecord("bad_messages", f"{what} is not a tool call {{function: {{name, arguments}}}}")
    out = {k: v for k, v in call.items() if k in ("id", "type")}
    out["type"] = out.get("type", "function")
    out["function"] = {"name": fn["name"], "arguments": _json_value(fn.get("arguments", {}),
                                                                    f"{what}.function.arguments")}
    return out


def _message(m: Any, where: str, role_map: dict[str, str], ignored: list[str]) -> dict[str, Any]:
    """One OpenAI-style message, checked and reduced to the fields the template reads."""
    if not isinstance(m, dict) or "role" not in m or not ("content" in m or "tool_calls" in m):
        raise BadRecord("bad_messages", f"{where} is not an object with role and content")
    role = role_map.get(m["role"], m["role"])
    if role not in ROLES:
        raise BadRecord("unknown_role", f"{where} has unknown role {m['role']!r} (use one of "
                        f"{', '.join(ROLES)}, or map it with chat.role_map)")
    msg: dict[str, Any] = {"role": role}
    calls = m.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise BadRecord("bad_messages", f"{where}.tool_calls must be a list on an assistant turn")
        msg["content"] = None if m.get("content") is None else _text(m["content"], f"{where}.content")
        msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    else:
        msg["content"] = _text(m.get("content"), f"{where}.content")
    for k in ("tool_call_id", "name", "reasoning_content", "thinking"):
        if m.get(k) is not None:
            msg[k] = _text(m[k], f"{where}.{k}")
    ignored += [f"{where.split('[')[0]}[].{k}" for k in m if k not in MESSAGE_FIELDS]
    return msg


def _from_messages(raw: Any, f: RecordFields, ignored: list[str]) -> list[dict[str, Any]]:
    name = f.messages_field
    if not isinstance(raw, list) or not raw:
        raise BadRecord("bad_messages", f"field {name!r} is not a non-empty list of messages")
    if all(isinstance(m, dict) and "from" in m and "role" not in m for m in raw):
        return _from_sharegpt(raw, f, name, ignored)   # ShareGPT turns under a messages field
    return [_message(m, f"{name}[{i}]", f.role_map, ignored) for i, m in enumerate(raw)]


def _from_sharegpt(raw: Any, f: RecordFields, name: str, ignored: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise BadRecord("bad_messages", f"field {name!r} is not a non-empty list of turns")
    roles = {**SHAREGPT_ROLES, **f.role_map}
    out = []
    for i, t in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise BadRecord("bad_messages", f"{where} is not an object with from and value")
        if t["from"] not in roles or roles[t["from"]] not in ROLES:
            raise BadRecord("unknown_role", f"{where} has unknown from {t['from']!r} (use one of "
                            f"{', '.join(SHAREGPT_ROLES)}, or map it with chat.role_map)")
        if t["from"] == "function_call":
            calls = _json_value(t["value"], f"{where}.value")
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": "assistant", "content": None,
                        "tool_calls": [_tool_call(c, f"{where}.value") for c in calls]})
        else:
            out.append({"role": roles[t["from"]], "content": _text(t["value"], f"{where}.value")})
        ignored += [f"{name}[].{k}" for k in t if k not in ("from", "value")]
    return out


def _from_instruction(rec: dict, f: RecordFields) -> list[dict[str, Any]]:
    parts = [_text(rec[k], f"field {k!r}") for k in f.instruction_fields
             if k in rec and rec[k] is not None]
    user = "\n\n".join(p for p in parts if p.strip())
    msgs = []
    if f.system_field and rec.get(f.system_field) is not None:
        msgs.append({"role": "system", "content": _text(rec[f.system_field], f"field {f.system_field!r}")})
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": _text(rec[f.output_field], f"field {f.output_field!r}")})
    return msgs


def record_format(rec: dict, f: RecordFields) -> str:
    """The shape of one record (chat.format=auto), or the forced one."""
    if f.format != "auto":
        return f.format
    if f.messages_field in rec:
        return "messages"
    if f.conversations_field in rec:
        return "sharegpt"
    if f.prompt_field in rec and f.completion_field in rec:
        return "prompt_completion"
    if f.output_field in rec and f.instruction_fields[0] in rec:
        return "instruction"
    raise BadRecord("missing_field", f"record has none of the fields {f.shapes()} (it has "
                    f"{sorted(rec)[:8]}); set chat.format and the chat field names")


_NEEDS = {"messages": lambda f: [f.messages_field], "sharegpt": lambda f: [f.conversations_field],
          "prompt_completion": lambda f: [f.prompt_field, f.completion_field],
          "instruction": lambda f: [f.instruction_fields[0], f.output_field]}


def to_conversation(rec: Any, f: RecordFields) -> Conversation:
    """The record's conversation, checked; raises BadRecord naming what is wrong."""
    if not isinstance(rec, dict):
        raise BadRecord("missing_field", f"record is a {type(rec).__name__}, not an object with "
                        f"{f.shapes()}")
    shape = record_format(rec, f)
    missing = [k for k in _NEEDS[shape](f) if k not in rec]
    if missing:
        raise BadRecord("missing_field", f"record has no field {missing[0]!r} (chat.format={shape}; "
                        f"it has {sorted(rec)[:8]})")
    ignored: list[str] = []
    used = set(_NEEDS[shape](f)) | {f.tools_field}
    if shape == "messages":
        msgs = _from_messages(rec[f.messages_field], f, ignored)
    elif shape == "sharegpt":
        msgs = _from_sharegpt(rec[f.conversations_field], f, f.conversations_field, ignored)
        if f.system_field and isinstance(rec.get(f.system_field), str) and rec[f.system_field].strip() \
                and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": rec[f.system_field]})
        used.add(f.system_field)
    elif shape == "prompt_completion":
        msgs = [{"role": "user", "content": _text(rec[f.prompt_field], f"field {f.prompt_field!r}")},
                {"role": "assistant",
                 "content": _text(rec[f.completion_field], f"field {f.completion_field!r}")}]
    else:
        msgs = _from_instruction(rec, f)
        used |= set(f.instruction_fields) | {f.system_field}
    ignored += [k for k in rec if k not in used]
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not (m["content"] or "").strip() and not m.get("tool_calls"):
            raise BadRecord("empty_assistant", f"assistant turn {i} is empty")
    tools = _json_value(rec.get(f.tools_field), f"field {f.tools_field!r}") or None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRecord("bad_messages", f"field {f.tools_field!r} is not a list of tool schemas")
    return Conversation(msgs, tools, ignored)


def message_texts(rec: Any, f: RecordFields) -> list[str]:
    """The texts of a record's messages (for training a tokenizer); [] when unusable."""
    try:
        return [m["content"] for m in to_conversation(rec, f).messages if m.get("content")]
    except BadRecord:
        return []
