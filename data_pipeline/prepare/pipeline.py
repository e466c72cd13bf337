"""`python -m data_pipeline.prepare`: corpus -> tokenized WebDataset shards + manifest.json.

    python -m data_pipeline.prepare                       # demo: stdlib .py files -> data/stdlib
    python -m data_pipeline.prepare source.path=corpus.jsonl out=data/mine tokenizer.vocab_size=32000
    python -m data_pipeline.prepare 'sources=[{path:a.jsonl,weight:3},{path:b/,weight:1}]' out=...

Sources are checked before any work; the output is built under a temporary name and renamed
when complete; rerunning on unchanged sources and settings is a no-op (manifest fingerprint).
See manifest.py for the output layout and shard_format.py for the sample format.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from data_pipeline.prepare import chat, chat_prepare, preference
from data_pipeline.prepare import encode as enc
from data_pipeline.prepare.chat_records import CHAT_RECORD_ERRORS
from data_pipeline.prepare.config import (
    PrepareConfig,
    PrepareConfigError,
    load_prepare_config,
)
from data_pipeline.prepare.publish import remote_manifest_if_current, upload
from data_pipeline.prepare.report import PrepareError, check_yield, print_report
from data_pipeline.prepare.sources import (
    Source,
    check_source,
    iter_mixed,
    mark_records,
    resolve_source,
    source_fingerprint,
)
from data_pipeline.prepare.tokenizer import copy_tokenizer, train_bpe
from data_pipeline.shards.format import TOKEN_EXTS, ShardWriter, ext_for_vocab
from data_pipeline.shards.manifest import (
    MANIFEST_NAME,
    build_manifest,
    load_manifest,
    manifest_is_current,
    write_index_bundle,
    write_json_atomic,
)
from data_pipeline.storage.backends import is_remote

FORMAT_VERSION = 1


def _tokenizer_fingerprint(cfg: PrepareConfig) -> dict:
    t = cfg.tokenizer
    if not t.path:
        return {"train": True, "vocab_size": t.vocab_size, "min_frequency": t.min_frequency,
                "max_train_docs": t.max_train_docs}
    h = hashlib.sha256()
    for p in sorted(Path(t.path).iterdir()):
        if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                               "added_tokens")) or p.suffix == ".model"):
            h.update(p.name.encode() + p.read_bytes())
    return {"path": str(Path(t.path).resolve()), "sha256": h.hexdigest()}


def fingerprint(cfg: PrepareConfig, sources: list[Source], template: str | None = None) -> str:
    """Everything that changes the output: sources (files, sizes, mtimes) and settings."""
    blob = {"version": FORMAT_VERSION, "sources": [source_fingerprint(s) for s in sources],
            "tokenizer": _tokenizer_fingerprint(cfg), "shard": asdict(cfg.shard),
            "split": asdict(cfg.split), "mix": asdict(cfg.mix) if len(sources) > 1 else None,
            "on_bad_utf8": cfg.on_bad_utf8, "on_bad_record": cfg.on_bad_record}
    if template is not None:  # text outputs keep their fingerprint (no rebuild after upgrades)
        blob["chat"] = chat.fingerprint(cfg.chat, template)
    if cfg.mode == "preference":
        blob.update(preference.fingerprint(cfg))
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _record_error(reason: str, where: str, detail: str, mode: str = "text") -> PrepareError:
    what = f"{where}: {detail}" if mode in ("chat", "preference") else enc.describe(reason, where, detail)
    if reason in chat.FATAL_REASONS:
        return PrepareError(what)
    return PrepareError(f"{what} (set on_bad_record=skip to skip such records and count them)")


def _is_record_error(reason: str, cfg: PrepareConfig) -> bool:
    if reason in chat.FATAL_REASONS:
        return True
    errors = {"chat": CHAT_RECORD_ERRORS, "preference": preference.RECORD_ERRORS}.get(cfg.mode, enc.RECORD_ERRORS)
    return reason in errors and cfg.on_bad_record == "raise"


def _training_texts(sources: list[Source], cfg: PrepareConfig) -> Iterator[str]:
    n = 0
    for src, payload, where in iter_mixed(sources, cfg.mix):
        text, reason, _ = enc.decode(payload, sources[src].kind, sources[src].text_field, cfg.on_bad_utf8)
        if reason in enc.RECORD_ERRORS and cfg.on_bad_record == "raise":
            raise _record_error(reason, where, sources[src].text_field)
        if text is not None:
            yield text
            n += 1
            if cfg.tokenizer.max_train_docs and n >= cfg.tokenizer.max_train_docs:
                return


def _tasks(records: Iterable, size: int, counts: collections.Counter) -> Iterator[list]:
    task = []
    for rec in records:
        counts[rec[0]] += 1
        task.append(rec)
        if len(task) == size:
            yield task
            task = []
    if task:
        yield task


def _bounded_map(fn: Callable, tasks: Iterator, settings, procs: int) -> Iterator:
    """fn over tasks in order on `procs` processes, at most 2 x procs tasks in flight
    (Executor.map would read the whole corpus into its queue first)."""
    init = chat.init if isinstance(settings, chat.ChatSettings) else \
        preference.init if isinstance(settings, preference.PreferenceSettings) else enc.init
    if procs == 1:
        init(settings)
        yield from map(fn, tasks)
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; quiet after fork
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(procs, mp_context=ctx, initializer=init, initargs=(settings,)) as ex:
        pending: collections.deque[Future] = collections.deque()
        try:
            for task in tasks:
                pending.append(ex.submit(fn, task))
                if len(pending) >= 2 * procs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _encode_all(sources: list[Source], cfg: PrepareConfig, settings,
                writers: dict[str, ShardWriter]) -> dict:
    procs = cfg.num_proc or min(8, os.cpu_count() or 1)
    read, skipped, written = collections.Counter(), collections.Counter(), collections.Counter()
    tokens = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    replaced = truncated = trained = pieced = split_convs = 0
    ignored: collections.Counter = collections.Counter()
    ignored_at: dict[str, str] = {}
    pieces_exact = True
    fn, reasons = {"chat": (chat.encode, chat.CHAT_SKIP_REASONS),
                   "preference": (preference.encode, preference.SKIP_REASONS)}.get(
        cfg.mode, (enc.encode, enc.SKIP_REASONS))
    diverged = 0
    t0 = time.time()
    bar = tqdm(unit="doc", desc="tokenize", disable=not cfg.progress, dynamic_ncols=True)
    tasks = _tasks(iter_mixed(sources, cfg.mix), cfg.batch_docs, read)
    for task_out in _bounded_map(fn, tasks, settings, procs):
        for reason, where, detail in task_out.skipped:
            if _is_record_error(reason, cfg):
                raise _record_error(reason, where, detail, cfg.mode)
            skipped[reason] += 1
            if len(examples[reason]) < 5:
                examples[reason].append(where)
        replaced += task_out.replaced_utf8
        written.update(task_out.written)
        pieced += task_out.pieced
        pieces_exact &= task_out.pieces_exact
        truncated += task_out.truncated
        trained += task_out.trained
        split_convs += task_out.split
        for name, where in task_out.ignored:
            ignored[name] += 1
            ignored_at.setdefault(name, where)
        diverged += task_out.diverged
        for is_val, data, *mask in task_out.docs:
            split = "val" if is_val else "train"
            writers[split].write(data, *mask)
            tokens[split] += len(data) // TOKEN_EXTS[writers[split].ext].itemsize
        bar.update(len(task_out.docs) + len(task_out.skipped))
        bar.set_postfix_str(f"{sum(tokens.values()) / max(time.time() - t0, 1e-9):,.0f} tok/s",
                            refresh=False)
    bar.close()
    report = {"documents_read": sum(read.values()),
              "read_per_source": {sources[i].label: read[i] for i in sorted(read)},
              "skipped": {r: skipped[r] for r in reasons},
              "skipped_examples": dict(examples),
              "pieced_documents": pieced, "pieces_exact": pieces_exact,
              "utf8_replaced": replaced, "tokens": dict(tokens),
              "seconds": round(time.time() - t0, 3)}
    if cfg.mode == "chat":
        report.update(truncated=truncated, trained_tokens=trained, split_conversations=split_convs,
                      ignored_fields={k: [n, ignored_at[k]] for k, n in sorted(ignored.items())})
    elif cfg.mode == "preference":
        report.update(truncated=truncated, completion_tokens=trained, diverged=diverged)
    else:  # chat records are not counted per source
        report["written_per_source"] = {sources[i].label: written[i] for i in range(len(sources))}
    return report


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(cfg: PrepareConfig) -> dict:
    """Run prepare; returns the manifest (the existing one when already up to date)."""
    keys = ["source"] if not cfg.sources else [f"sources[{i}]" for i in range(len(cfg.sources))]
    sources = [resolve_source(s, k) for s, k in zip(cfg.source_list(), keys)]
    template = None
    if cfg.mode == "chat":
        mark_records(sources, keys, "chat", "conversations (or use mode=text)")
        template = chat_prepare.resolve_template(cfg)
    if cfg.mode == "preference":
        mark_records(sources, keys, "preference", "pairs with chosen and rejected fields")
    for s, k in zip(sources, keys):
        check_source(s, k)
    fp = fingerprint(cfg, sources, template)
    if is_remote(cfg.out):
        return _prepare_remote(cfg, sources, fp, template)
    out = Path(cfg.out)
    if not cfg.force and manifest_is_current(out, fp):
        print(f"prepare: {out} is up to date (fingerprint {fp[:12]}); nothing to do")
        return load_manifest(out / MANIFEST_NAME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build(cfg, sources, fp, tmp, template)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_report(out, manifest)
    return manifest


def _prepare_remote(cfg: PrepareConfig, sources: list[Source], fp: str, template: str | None) -> dict:
    """Build locally, then upload with manifest.json last (publish.py)."""
    if not cfg.force:
        current = remote_manifest_if_current(cfg.out, fp, cfg.storage)
        if current is not None:
            print(f"prepare: {cfg.out} is up to date (fingerprint {fp[:12]}); nothing to do")
            return current
    with tempfile.TemporaryDirectory(prefix="scaletrain-prepare-") as tmp:
        manifest = _build(cfg, sources, fp, Path(tmp), template)
        upload(Path(tmp), cfg.out, cfg.storage)
    print_report(cfg.out.rstrip("/"), manifest)
    return manifest


def _tokenizer(cfg: PrepareConfig, sources: list[Source], tok_dir: Path, template: str | None):
    if cfg.tokenizer.path:
        tok = copy_tokenizer(cfg.tokenizer.path, tok_dir)
        tok_info = {"dir": "tokenizer", "source": str(Path(cfg.tokenizer.path).resolve())}
    else:
        texts = chat_prepare.training_texts(sources, cfg) if template is not None else \
            _training_texts(sources, cfg)
        tok = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, tok_dir,
                        progress=cfg.progress, chat_tokens=chat.CHATML_TOKENS if template else ())
        tok_info = {"dir": "tokenizer", "source": "trained",
                    "vocab_size_requested": cfg.tokenizer.vocab_size}
    if template is not None:
        chat_prepare.save_with_template(tok, template, tok_dir)
    tok_info.update(vocab_size=len(tok), eos_token=tok.eos_token, eos_token_id=tok.eos_token_id,
                    files=sorted(p.name for p in tok_dir.iterdir() if p.is_file()))
    return tok, tok_info


def _build(cfg: PrepareConfig, sources: list[Source], fp: str, tmp: Path,
           template: str | None = None) -> dict:
    tok_dir = tmp / "tokenizer"
    tok, tok_info = _tokenizer(cfg, sources, tok_dir, template)
    vocab = len(tok)
    ext = ext_for_vocab(vocab)
    if template is not None:
        settings = chat_prepare.settings(cfg, sources, tok_dir, TOKEN_EXTS[ext].str)
    elif cfg.mode == "preference":
        settings = preference.settings(cfg, sources, tok_dir, TOKEN_EXTS[ext].str)
    else:
        settings = enc.Settings(str(tok_dir / "tokenizer.json"), tok.eos_token_id, TOKEN_EXTS[ext].str,
                                [(s.kind, s.text_field) for s in sources], cfg.on_bad_utf8,
                                cfg.split.val_fraction, cfg.split.seed)
    writers = {split: ShardWriter(tmp, split, ext, cfg.shard.max_bytes) for split in ("train", "val")}
    report = _encode_all(sources, cfg, settings, writers)
    check_yield(report, [x.label for x in sources], cfg)
    records = {split: w.close() for split, w in writers.items()}
    report["documents_written"] = {s: sum(r.samples for r in recs) for s, recs in records.items()}
    report["shards"] = {s: len(recs) for s, recs in records.items()}
    settings_out = {"sources": [{"label": s.label, "format": s.format, "files": len(s.files),
                                 "text_field": s.text_field, "weight": s.weight} for s in sources],
                    "tokenizer": asdict(cfg.tokenizer), "shard": asdict(cfg.shard),
                    "split": asdict(cfg.split), "mix": asdict(cfg.mix),
                    "on_bad_utf8": cfg.on_bad_utf8, "on_bad_record": cfg.on_bad_record,
                    "mode": cfg.mode, "chat": asdict(cfg.chat) if template is not None else None,
                    **({"preference": asdict(cfg.preference)} if cfg.mode == "preference" else {})}
    manifest = build_manifest(splits=records, ext=ext, vocab_size=vocab,
                              eos_token_id=tok.eos_token_id, tokenizer=tok_info, fingerprint=fp,
                              settings=settings_out, report=report,
                              chat=chat_prepare.manifest_entry(cfg, tok) if template is not None else None,
                              index_bundle=write_index_bundle(tmp, records),
                              preference=preference.manifest_entry(cfg, tok) if cfg.mode == "preference" else None)
    write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from data_pipeline.overrides import exit_on_bad_override

    exit_on_bad_override("prepare: error: ")

    @hydra.main(config_path=str(Path(__file__).resolve().parents[2] / "conf"), config_name="prepare", version_base=None)
    def _run(dcfg) -> None:
        try:
            prepare(load_prepare_config(OmegaConf.to_container(dcfg, resolve=True)))
        except (PrepareConfigError, ValueError) as e:
            print(f"prepare: error: {e}", file=sys.stderr)
            sys.exit(2)

    _run()


