"""The closing report of `prepare`: counts by reason with the setting that fixes each, the
prepare.max_dropped_frac check, and the summary printed at the end."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.prepare import encode as enc
from data_pipeline.prepare.config import PrepareConfig
from data_pipeline.shards.manifest import MANIFEST_NAME


class PrepareError(ValueError):
    """Bad input found while reading (on_bad_record=raise), or too much of it skipped."""


FIXES = {
    "empty": "blank lines and empty documents are not records (not counted as dropped)",
    "bad_utf8": "on_bad_utf8=replace keeps them, with U+FFFD for the bad bytes",
    "bad_json": "repair those lines (on_bad_record=raise stops at the first and names it)",
    "missing_field": "source.text_field=FIELD names the field that holds the text",
    "not_text": "source.text_field=FIELD must name a field holding strings",
    "binary": "narrow source.path (a glob such as 'corpus/**/*.txt') to leave binary files out",
}
CHAT_FIXES = {
    **FIXES,
    "missing_field": "chat.format and the chat field names (chat.messages_field, chat.conversations_field, "
                     "chat.prompt_field, ...) must match the records",
    "not_text": "message contents must be strings (a list of content parts is not read); tool calls go "
                "in tool_calls, whose content may be null",
    "bad_messages": "chat.messages_field / chat.conversations_field must name a list of turns ({role, "
                    "content} or {from, value}); chat.format forces one shape",
    "unknown_role": "chat.role_map={NAME: assistant} maps other role names to system/user/assistant/tool",
    "empty_assistant": "an empty assistant turn has nothing to learn: fill or drop those records",
    "template_error": "chat.template=PATH_OR_JINJA sets a template that accepts these conversations",
    "history_changed": "chat.on_history_change=split trains such turns in samples of their own",
    "no_assistant": "chat.train_on=all trains every token of conversations without an assistant turn",
    "too_long": "chat.max_len=N (with trainer.seq_len >= N) or chat.on_long=truncate keeps them",
    "truncated_away": "chat.max_len=N: raise it (with trainer.seq_len >= N) so that the assistant turns fit",
}
"""Per skip reason: the setting (or action) that fixes it, printed with every count."""
PREFERENCE_FIXES = {
    **FIXES,
    "missing_field": "each record needs `chosen` and `rejected` (and `prompt`, unless the prompt is "
                     "their common prefix of messages): rename those fields",
    "bad_messages": "conversational `prompt`/`chosen`/`rejected` must be lists of {role, content} messages",
    "not_text": "`prompt`, `chosen` and `rejected` must be strings or lists of messages",
    "empty_completion": "a pair with an empty chosen or rejected completion has nothing to compare: drop it",
    "prompt_has_reply": "an implicit-prompt pair whose shared prefix ends with an assistant reply: give an "
                        "explicit `prompt`",
    "identical": "chosen and rejected are the same: nothing to prefer; drop those pairs",
    "template_error": "chat.template=PATH_OR_JINJA sets a template that renders these conversations",
    "too_long": "preference.max_len=N (with trainer.seq_len >= N) or preference.on_long=truncate keeps them",
    "truncated_away": "preference.max_len=N: raise it so that the completions fit after the prompt",
}


def _skip_lines(report: dict, mode: str) -> list[str]:
    """One line per skip reason seen: count, examples, and the setting that fixes it."""
    fixes = {"chat": CHAT_FIXES, "preference": PREFERENCE_FIXES}.get(mode, FIXES)
    ex = report["skipped_examples"]
    return [f"  {k}: {n} (e.g. {', '.join(ex.get(k, [])[:3])}): {fixes.get(k, 'see the records named')}"
            for k, n in report["skipped"].items() if n]


def check_yield(report: dict, labels: list[str], cfg: PrepareConfig) -> None:
    """An input that gives no document, or more records dropped than prepare.max_dropped_frac, is an
    error with the counts by reason and each reason's fix (not an output that fails or misleads later)."""
    if "written_per_source" in report:
        empty = [label for label, n in report["written_per_source"].items() if n == 0]
    else:  # chat: all inputs together
        empty = [] if sum(report["tokens"].values()) else labels
    skipped = report["skipped"]
    records = report["documents_read"] - skipped.get("empty", 0)
    dropped = sum(n for k, n in skipped.items() if k != "empty")
    limit = cfg.prepare.max_dropped_frac
    if empty:
        counts = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"
        head = f"{' and '.join(empty)} gave no documents ({report['documents_read']} records read, skipped {counts})"
        fix = "" if dropped else ": point source.path at text, JSONL, Parquet or a datasets directory that holds documents"
    elif records and dropped / records > limit:
        counts = ", ".join(f"{k}={v}" for k, v in skipped.items() if v and k != "empty")
        head = (f"{dropped} of {records} records dropped ({dropped / records:.1%} > "
                f"prepare.max_dropped_frac={limit:g}; {counts})")
        fix = f"; set prepare.max_dropped_frac={min(1.0, round(dropped / records + 0.005, 2)):g} to accept that"
    else:
        return
    lines = _skip_lines(report, cfg.mode)
    raise PrepareError(head + fix + (":\n" + "\n".join(lines) if lines else ""))


def print_report(out: Path | str, m: dict) -> None:
    r, sp = m["report"], m["splits"]
    secs = max(r["seconds"], 1e-9)
    skipped = " ".join(f"{k}={v}" for k, v in r["skipped"].items())
    lines = [f"prepare: read {r['documents_read']:,} documents in {r['seconds']:.1f} s "
             f"({r['documents_read'] / secs:,.0f} docs/s, {m['totals']['tokens'] / secs:,.0f} tokens/s)",
             f"  skipped: {skipped}; utf-8 replaced in {r['utf8_replaced']}"]
    if m.get("mode") == "chat":
        lines.append(f"  chat: masks from {m['chat'].get('masks', 'markers')}; truncated to max_len="
                     f"{m['chat']['max_len']}: {r['truncated']}; split into per-turn samples: "
                     f"{r.get('split_conversations', 0)}; trained tokens: {r['trained_tokens']:,}")
        lines += [f"  field {k} left out of the template: {n} records (e.g. {where})"
                  for k, (n, where) in r.get("ignored_fields", {}).items()]
    if m.get("mode") == "preference":
        lines.append(f"  preference: truncated to max_len={m['preference']['max_len']}: {r['truncated']}, "
                     f"prompt not a prefix of prompt + completion (completion starts where they "
                     f"diverge): {r['diverged']}")
    lines += _skip_lines(r, m.get("mode", "text"))
    if r.get("pieced_documents"):
        lines.append(f"  {r['pieced_documents']} documents over {enc.PIECE_CHARS:,} characters tokenized in pieces"
                     + ("" if r["pieces_exact"] else " (this tokenizer splits words differently at a cut: "
                        "tokens may differ there)"))
    lines += [f"  train: {sp['train']['samples']:,} docs, {sp['train']['tokens']:,} tokens, "
              f"{len(sp['train']['shards'])} shards",
              f"  val:   {sp['val']['samples']:,} docs, {sp['val']['tokens']:,} tokens, "
              f"{len(sp['val']['shards'])} shards",
              f"  wrote {out}/ ({MANIFEST_NAME}, tokenizer/ vocab {m['vocab_size']:,}, {m['dtype']})"]
    print("\n".join(lines))
