"""Chat batches against text batches: what whole-conversation rows and the stored mask cost.

    python bench/chat_loader.py [--docs 20000] [--batch 8] [--seq-len 2048] [--seconds 3]
    python bench/chat_loader.py --mix [same options]: data.mix of 3 sources against one (mix_bench)

One synthetic corpus (random token ids, conversation lengths 50..600 tokens, assistant runs
in the mask) is written twice with the same writer as prepare: as text shards (tokens only)
and as chat shards (tokens + `.mask`). On both, in one run, the loader builds [B, T] batches
in the training process (num_workers=0, so the figure is the per-core cost):

  (a) text: the packed token stream (the baseline),
  (b) chat, data.pack=true: whole conversations packed per row, labels from the mask,
  (c) chat, data.pack=false: one conversation per row, padded.

Also timed: packing one epoch's rows (RowOrder, once per epoch per worker). Figures are
target tokens per second (non -100 labels) and rows per second.

Prepare side (`--prepare-convs`, 0 = skip): conversations per second of one tokenizer process
(`chat.encode` on JSONL records, as prepare's workers run it) with a Llama-3-style template, masks
found by incremental rendering (`chat.masks=render`, the stock template) against HF's
`{% generation %}` marker masks (`chat.masks=markers`); both give the same shards (checked here).
Ends with one JSON line, ratios first.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.read.config import WebDatasetConfig  # noqa: E402
from data_pipeline.read.loader import WebDatasetLoader  # noqa: E402
from data_pipeline.read.rows import RowOrder  # noqa: E402
from data_pipeline.shards.format import ShardWriter  # noqa: E402
from data_pipeline.shards.manifest import MANIFEST_NAME, build_manifest, write_json_atomic  # noqa: E402


def write(root: Path, docs: list[np.ndarray], masks: list[np.ndarray] | None, max_len: int) -> Path:
    w = ShardWriter(root, "train", "u16", 64 << 20)
    for i, d in enumerate(docs):
        w.write(d, None if masks is None else masks[i])
    chat = {"max_len": max_len, "mask_ext": "mask", "pad_token_id": 0, "train_on": "assistant",
            "on_long": "truncate"} if masks is not None else None
    m = build_manifest(splits={"train": w.close()}, ext="u16", vocab_size=32000, eos_token_id=0,
                       tokenizer=None, fingerprint="bench", chat=chat)
    write_json_atomic(root / MANIFEST_NAME, m)
    return root


def corpus(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n):
        length = int(rng.integers(50, 601))
        docs.append(rng.integers(1, 32000, length).astype(np.uint16))
        mask = np.zeros(length, np.uint8)
        for _ in range(int(rng.integers(1, 4))):  # a few assistant runs
            a = int(rng.integers(0, length - 10))
            mask[a:a + int(rng.integers(5, 60))] = 1
        masks.append(mask)
    return docs, masks


def measure(root: Path, batch: int, seq_len: int, seconds: float, pack: bool = True) -> dict:
    cfg = WebDatasetConfig(urls=str(root), num_workers=0, pack=pack)
    ld = WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=batch, seq_len=seq_len)
    it = iter(ld)
    next(it)  # first batch builds the epoch's plan
    n = targets = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        targets += int((b["labels"] != -100).sum())
        n += 1
    dt = time.perf_counter() - t0
    return {"batches_per_s": n / dt, "rows_per_s": n * batch / dt, "target_tokens_per_s": targets / dt,
            "target_fraction": targets / (n * batch * seq_len)}


def prepare_throughput(n: int, tmp: Path, repeat: int = 2) -> dict:
    """Conversations/s of chat.encode with render masks and with marker masks (best of `repeat`)."""
    from data_pipeline.prepare import chat
    from data_pipeline.prepare.chat_records import RecordFields
    from tests.support.chat_templates import build_family_tokenizer, family_conversations

    build_family_tokenizer(tmp / "tok", "llama3", marked=True)
    recs = family_conversations("llama3", n, seed=0)
    payloads = [(0, json.dumps(r).encode().decode("latin-1"), f"bench:{i}") for i, r in enumerate(recs)]
    fields = RecordFields("messages", "prompt", "completion", ["instruction", "input"], "output", "system")
    rates, docs = {}, {}
    for masks in ("markers", "render"):
        chat.init(chat.ChatSettings(str(tmp / "tok"), "<u2", ["raw_jsonl"], fields, "assistant", 1 << 16,
                                    "truncate", "replace", 0.0, 0, masks, "split"))
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = [chat.encode(payloads[i:i + 64]) for i in range(0, n, 64)]
            best = min(best, time.perf_counter() - t0)
        rates[masks] = n / best
        docs[masks] = [d for o in out for d in o.docs]
    assert docs["render"] == docs["markers"], "render and marker masks differ"
    turns = sum(m["role"] == "assistant" for r in recs for m in r["messages"])
    return {"prepare_render_convs_per_s": round(rates["render"], 1),
            "prepare_markers_convs_per_s": round(rates["markers"], 1),
            "prepare_render_vs_markers": round(rates["render"] / rates["markers"], 3),
            "prepare_convs": n, "prepare_assistant_turns_per_conv": round(turns / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--prepare-convs", type=int, default=2000)
    args = ap.parse_args()
    docs, masks = corpus(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        text = write(Path(tmp) / "text", docs, None, args.seq_len)
        chat = write(Path(tmp) / "chat", docs, masks, args.seq_len)
        r = {"text": measure(text, args.batch, args.seq_len, args.seconds),
             "chat_pack": measure(chat, args.batch, args.seq_len, args.seconds),
             "chat_nopack": measure(chat, args.batch, args.seq_len, args.seconds, pack=False)}
        ld = WebDatasetLoader(WebDatasetConfig(urls=str(chat), num_workers=0), rank=0, world_size=1,
                              micro_batch_size=args.batch, seq_len=args.seq_len)
        t0 = time.perf_counter()
        rows = RowOrder(ld.order, args.seq_len, True).rows_in(0)
        plan_s = time.perf_counter() - t0
        prep = prepare_throughput(args.prepare_convs, Path(tmp)) if args.prepare_convs else {}
    for k, v in r.items():
        print(f"{k:12s} {v['batches_per_s']:8.1f} batches/s {v['rows_per_s']:9.1f} rows/s "
              f"{v['target_tokens_per_s'] / 1e6:7.2f} M target tok/s  target fraction {v['target_fraction']:.3f}")
    print(f"packing one epoch: {args.docs} conversations -> {rows} rows in {plan_s * 1e3:.0f} ms")
    if prep:
        print(f"prepare, one process: {prep['prepare_render_convs_per_s']:,.0f} conversations/s with render "
              f"masks, {prep['prepare_markers_convs_per_s']:,.0f} with marker masks "
              f"({prep['prepare_assistant_turns_per_conv']} assistant turns per conversation)")
    print(json.dumps({**({"prepare_render_vs_markers": prep["prepare_render_vs_markers"]} if prep else {}),
        "chat_pack_vs_text_batches": round(r["chat_pack"]["batches_per_s"] / r["text"]["batches_per_s"], 3),
        "chat_nopack_vs_text_batches": round(r["chat_nopack"]["batches_per_s"] / r["text"]["batches_per_s"], 3),
        "chat_pack_row_fill": round(sum(len(d) for d in docs) / (rows * args.seq_len), 3),
        "epoch_plan_ms": round(plan_s * 1e3, 1), "docs": args.docs, "batch": args.batch,
        "seq_len": args.seq_len, **{f"{k}_batches_per_s": round(v["batches_per_s"], 1) for k, v in r.items()},
        **prep}))


# --- data.mix: 3 sources against one (`python bench/chat_loader.py --mix`) ----------------------

def mix_bench(n_docs: int, batch: int, seq_len: int, seconds: float) -> dict:
    """Batches per second of a 3-source data.mix (weights 0.5/0.3/0.2) against one source holding
    the same documents, for text and for packed chat shards, in the training process. A mix reads
    one row per source lookup (read/mix.py), the single source one span per micro-batch."""
    from data_pipeline import build_loader
    from data_pipeline.read.config import MixSource

    def rate(cfg: WebDatasetConfig) -> float:
        it = iter(build_loader(cfg, rank=0, world_size=1, micro_batch_size=batch, seq_len=seq_len))
        next(it)  # plans the first epoch(s)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(it)
            n += 1
        return n / (time.perf_counter() - t0)

    docs, masks = corpus(n_docs)
    thirds = [slice(0, n_docs // 3), slice(n_docs // 3, 2 * n_docs // 3), slice(2 * n_docs // 3, n_docs)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, mk in (("text", None), ("chat", masks)):
            one = write(Path(tmp) / f"{kind}_one", docs, mk, seq_len)
            parts = [write(Path(tmp) / f"{kind}_{i}", docs[s], None if mk is None else mk[s], seq_len)
                     for i, s in enumerate(thirds)]
            single = rate(WebDatasetConfig(urls=str(one), num_workers=0))
            mixed = rate(WebDatasetConfig(num_workers=0, mix=[MixSource(urls=str(p), weight=w)
                                                              for p, w in zip(parts, (0.5, 0.3, 0.2))]))
            out[kind] = {"one_batches_per_s": round(single, 1), "mix3_batches_per_s": round(mixed, 1)}
    return out


def mix_main() -> None:
    ap = argparse.ArgumentParser(description="data.mix of 3 sources against one")
    ap.add_argument("--mix", action="store_true")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    r = mix_bench(args.docs, args.batch, args.seq_len, args.seconds)
    for kind, v in r.items():
        print(f"{kind:5s} one source {v['one_batches_per_s']:8.1f} batches/s   "
              f"mix of 3 {v['mix3_batches_per_s']:8.1f} batches/s")
    print(json.dumps({**{f"{k}_mix3_vs_one": round(v["mix3_batches_per_s"] / v["one_batches_per_s"], 3)
                         for k, v in r.items()},
                      "docs": args.docs, "batch": args.batch, "seq_len": args.seq_len,
                      **{f"{k}_{m}": x for k, v in r.items() for m, x in v.items()}}))


if __name__ == "__main__":
    mix_main() if "--mix" in sys.argv else main()
