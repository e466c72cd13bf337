"""`prepare mode=preference`: preference pairs (prompt, chosen, rejected) for `objective=dpo`.

The three input forms TRL's `DPOTrainer` reads, tried in this order:

- conversational: `{"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}`;
- standard: `{"prompt": str, "chosen": str, "rejected": str}` (the tokenizer's EOS is appended to
  a completion that does not already end with it, as TRL does);
- implicit prompt: `{"chosen": [conversation], "rejected": [conversation]}`: the prompt is the
  longest common prefix of messages (TRL's `extract_prompt`), and must not end in an assistant
  reply (the completions would then not be replies).

Rendering follows TRL: conversational records through the tokenizer's chat template, the prompt
with `add_generation_prompt=True` and each completion as the rendering of prompt + completion;
where the prompt's tokens are not a prefix of prompt + completion, the completion starts where
they diverge (counted in the report as `diverged`). Standard records are tokenized as text.

One pair is one sample of a chat-format shard (shards/format.py): its tokens are
prompt + chosen + rejected, and its `.mask` marks each token 0 (prompt), 1 (chosen completion) or
2 (rejected completion). The loader (read/pairs.py) rebuilds the two sequences prompt + chosen and
prompt + rejected, so a pair is one document: it streams, shuffles and resumes as one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_pipeline.prepare.chat_records import BadRecord, parse_payload
from data_pipeline.prepare.encode import Encoded, is_val
from data_pipeline.prepare.tokenizer import pad_token_id
from data_pipeline.shards.format import MASK_EXT

PROMPT, CHOSEN, REJECTED = 0, 1, 2
SKIP_REASONS = ("empty", "bad_utf8", "bad_json", "missing_field", "bad_messages", "not_text",
                "empty_completion", "prompt_has_reply", "identical", "template_error", "too_long",
                "truncated_away")
RECORD_ERRORS = ("bad_json", "missing_field", "bad_messages", "not_text", "empty_completion",
                 "prompt_has_reply")


@dataclass
class PreferenceSettings:
    """What every tokenizer process needs; picklable."""

    tokenizer_dir: str
    dtype: str
    kinds: list[str]            # per source: raw_jsonl or value
    max_len: int
    on_long: str
    on_bad_utf8: str
    val_fraction: float
    split_seed: int


_state: dict = {}


def init(settings: PreferenceSettings) -> None:
    from transformers import AutoTokenizer

    _state["settings"] = settings
    _state["tokenizer"] = AutoTokenizer.from_pretrained(settings.tokenizer_dir, local_files_only=True)


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad_messages", f"field {field!r} is not a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise BadRecord("bad_messages", f"{field}[{i}] is not an object with a role and a text content")
    return value


def split_record(rec: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one record in any of the three forms; raises BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord("missing_field", f"record is a {type(rec).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise BadRecord("missing_field", f"record has no {key!r} field (it has {sorted(rec)[:8]}); "
                            "a preference record needs chosen and rejected (and prompt, unless implicit)")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if "prompt" not in rec:  # implicit prompt: the common prefix of the two conversations
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise BadRecord("missing_field", "implicit-prompt record: chosen and rejected share no "
                            "leading message, so there is no prompt (add a 'prompt' field)")
        if prompt[-1].get("role") == "assistant":
            raise BadRecord("prompt_has_reply", "implicit-prompt record: the shared prompt already ends "
                            "with an assistant reply, so the completions are not replies to it")
        if not chosen or not rejected:
            raise BadRecord("empty_completion", "implicit-prompt record: one conversation is the other's "
                            "prefix, leaving an empty completion")
        return prompt, chosen, rejected
    prompt = rec["prompt"]
    if isinstance(prompt, list):
        return _messages(prompt, "prompt"), _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise BadRecord("not_text", f"field {key!r} is {type(value).__name__}, not a string "
                            "(or all three must be message lists)")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise BadRecord("empty_completion", f"field {key!r} is empty")
    return prompt, chosen, rejected


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tok, prompt: Any, chosen: Any, rejected: Any) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, chosen ids, rejected ids, diverged) by TRL's rule (see the module docstring)."""
    if isinstance(prompt, list):
        def ids(messages, **kw):
            return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
        p = ids(prompt, add_generation_prompt=True)
        pc, pr = ids(prompt + chosen), ids(prompt + rejected)
    else:
        eos = tok.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p = list(tok(prompt)["input_ids"])
        pc, pr = list(tok(prompt + chosen)["input_ids"]), list(tok(prompt + rejected)["input_ids"])
    n = min(_common(p, pc), _common(p, pr))
    return p[:n], pc[n:], pr[n:], n < len(p)


def _bounded(p: list[int], c: list[int], r: list[int], s: PreferenceSettings) -> tuple[list[int], list[int], bool]:
    """Chosen and rejected cut so that prompt + completion <= max_len (TRL's keep_start), or refused."""
    if not c or not r:
        raise BadRecord("empty_completion", "a completion renders to no tokens")
    if c == r:
        raise BadRecord("identical", "chosen and rejected completions are identical")
    longest = len(p) + max(len(c), len(r))
    if longest <= s.max_len:
        return c, r, False
    if s.on_long == "skip":
        raise BadRecord("too_long", f"prompt + completion has {longest} tokens > preference.max_len={s.max_len}")
    room = s.max_len - len(p)
    if room < 1:
        raise BadRecord("truncated_away", f"the prompt alone has {len(p)} tokens >= preference.max_len="
                        f"{s.max_len}: no completion token is left")
    c, r = c[:room], r[:room]
    if c == r:
        raise BadRecord("identical", "chosen and rejected are identical once truncated to "
                        f"preference.max_len={s.max_len}")
    return c, r, True


def encode(records: list[tuple[int, str | None, str]]) -> Encoded:
    """One task's records (source index, payload, where) -> docs of (is_val, tokens, mask)."""
    s: PreferenceSettings = _state["settings"]
    tok = _state["tokenizer"]
    out = Encoded()
    for src, payload, where in records:
        try:
            rec, replaced = parse_payload(payload, s.kinds[src], s.on_bad_utf8)
            out.replaced_utf8 += replaced
            prompt, chosen, rejected = split_record(rec)
            try:
                p, c, r, diverged = tokenize_pair(tok, prompt, chosen, rejected)
            except Exception as e:  # jinja2 errors, raise_exception() in templates
                raise BadRecord("template_error", f"the chat template refused it: {e}") from None
            c, r, cut = _bounded(p, c, r, s)
        except BadRecord as e:
            out.skipped.append((e.reason, where, str(e)))
            continue
        out.truncated += cut
        out.diverged += diverged
        tokens = np.asarray(p + c + r, dtype=s.dtype)
        mask = np.asarray([PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(r), np.uint8)
        key = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
        out.docs.append((is_val(key, s.val_fraction, s.split_seed), tokens.tobytes(), mask.tobytes()))
        out.tokens += len(tokens)
        out.trained += len(c) + len(r)
    return out


def settings(cfg, sources, tok_dir, dtype: str) -> PreferenceSettings:
    pc = cfg.preference
    return PreferenceSettings(str(tok_dir), dtype, [s.kind for s in sources], pc.max_len, pc.on_long,
                              cfg.on_bad_utf8, cfg.split.val_fraction, cfg.split.seed)


def fingerprint(cfg) -> dict:
    return {"preference": asdict(cfg.preference)}


def manifest_entry(cfg, tok) -> dict:
    return {"max_len": cfg.preference.max_len, "mask_ext": MASK_EXT, "pad_token_id": pad_token_id(tok),
            "on_long": cfg.preference.on_long, "mask_values": {"prompt": PROMPT, "chosen": CHOSEN,
                                                               "rejected": REJECTED}}
