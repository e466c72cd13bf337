"""What each GGUF format costs: file size, export time, peak memory and perplexity delta, per format.

    python bench/export_quality.py                  # demo model (trained) + a ~100M model from config
    python bench/export_quality.py --smoke          # seconds: a 1-layer model, two formats
    python bench/export_quality.py --models quantizers --rounds 7   # the quantizers alone, q8_0 interleaved

Two models, each exported by the real exporter (`export_checkpoint`, bf16 HF + every GGUF type, quality
measured by the exporter itself on held-out text):
- demo: the `model=tiny` architecture of `make demo` (hidden 64, intermediate 172) with a 4096-token BPE,
  trained here for --steps steps on this Python's stdlib sources (a plain torch loop on one process, the
  same corpus and learning rate as the demo), perplexity on held-out stdlib files. Its rows (64, 172)
  are not multiples of 256, so llama.cpp's fallbacks apply to every K-quant: the K-quant files are
  Q5_0/Q5_1/Q8_0/F16 mixes, exactly what llama-quantize would write.
- big: a ~100M-parameter Llama built from config (hidden 768, 12 layers, vocab 16384), random init
  (training it is out of reach on CPU): its size, time and memory figures are real, its perplexity
  deltas are those of an untrained model and only say that nothing broke.
Per format: the GGUF write (quantization included) is timed, and the process RSS is sampled every
5 ms during it (psutil): peak minus the RSS when it started. Ends with one JSON line, ratios first.
- quantizers: `kquants.quantize` alone on a (2048, 2048) Gaussian tensor, Q8_0 then each K type in turn,
  --rounds times; each K type's time over the Q8_0 time of the same round, median over rounds (on a
  shared machine the load changes between runs; interleaving keeps each ratio's two timings close).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL = ["f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m"]


def stdlib_text(max_chars: int) -> tuple[str, str]:
    """(training text, held-out text) from this Python's stdlib sources, as the demo's corpus."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = []
    total = 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(t)
        total += len(t)
        if total > max_chars:
            break
    held = len(texts) // 10 or 1
    return "\n".join(texts[held:]), "\n".join(texts[:held])


class Sampler:
    """RSS of this process every 5 ms, with the peak since the last `start()`."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.base = 0
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def start(self) -> None:
        self.base = self.peak = self.proc.memory_info().rss


def train_demo(tok_dir: Path, text: str, steps: int, layers: int, hidden: int, ffn: int, vocab: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = torch.tensor(tok.encode(text[:2_000_000]))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         use_cache=False, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = None
    for step in range(steps):
        for g in opt.param_groups:  # the demo's warmup-free schedule, with a cool-down at the end
            g["lr"] = 3e-3 if step < 0.8 * steps else 3e-4
        starts = torch.randint(0, ids.numel() - 129, (4,))
        batch = torch.stack([ids[s:s + 129] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item() if loss is not None else None


def random_model(layers: int, hidden: int, ffn: int, vocab: int, heads: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 3 or 1,
                         max_position_embeddings=2048, use_cache=False, bos_token_id=None, eos_token_id=None)
    return AutoModelForCausalLM.from_config(config)


def run_export(name: str, model: Any, tok_dir: Path, held_out: Path, formats: list[str], tokens: int,
               root: Path, sampler: Sampler) -> dict[str, Any]:
    from tests.helpers.export_checkpoints import make_checkpoint
    from train.export import gguf_export
    from train.export.config import ExportConfig
    from train.export.hf_export import export_checkpoint

    ckpt = make_checkpoint(root / name / "run", tokenizer_dir=str(tok_dir), model=model)
    windows: dict[str, dict[str, float]] = {}
    original = gguf_export.write_gguf

    def timed(export_dir: Path, config: Any, kind: str, **kw: Any) -> dict[str, Any]:
        sampler.start()
        t0 = time.perf_counter()
        info = original(export_dir, config, kind, **kw)
        windows[kind] = {"write_s": time.perf_counter() - t0, "peak_mib": (sampler.peak - sampler.base) / 2**20}
        return info

    gguf_export.write_gguf = timed
    try:
        t0 = time.perf_counter()
        meta = export_checkpoint(ckpt.path, root / name / "export",
                                 ExportConfig(kind="hf", gguf=formats, quality_text=str(held_out),
                                              quality_tokens=tokens, quality_seq_len=128, verify_new_tokens=0))
        total = time.perf_counter() - t0
    finally:
        gguf_export.write_gguf = original
    quality = {r["format"]: r for r in meta["quality"]["formats"]}
    rows = []
    for info in meta["gguf_files"]:
        q = quality[f"gguf-{info['type']}"]
        rows.append({"format": info["type"], "size_mib": round(info["size_bytes"] / 2**20, 3),
                     "bits_per_weight": round(info["bits_per_weight"], 3),
                     "write_s": round(windows[info["type"]]["write_s"], 2),
                     "peak_mib": round(windows[info["type"]]["peak_mib"], 1),
                     "ppl": round(q["perplexity"], 4), "delta_pct": round(q["delta_pct"], 3),
                     "fallback_tensors": len(info["fallback_tensors"])})
    hf = quality[f"hf-{meta['dtype']}"]
    return {"parameters": meta["parameters"], "reference_ppl": round(meta["quality"]["reference"]["perplexity"], 4),
            "hf_bf16_delta_pct": round(hf["delta_pct"], 3), "export_total_s": round(total, 1),
            "quality_tokens": meta["quality"]["tokens"], "formats": rows}


def time_quantizers(rows: int, cols: int, rounds: int) -> dict[str, Any]:
    """Median over rounds of (K-quant time / Q8_0 time of the same round), and the median seconds."""
    import statistics

    import gguf
    import numpy as np

    from train.export import kquants

    x = np.random.default_rng(0).normal(0, 0.02, (rows, cols)).astype(np.float32)
    names = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            t0 = time.perf_counter()
            kquants.quantize(x, gguf.GGMLQuantizationType[n])
            seconds[n].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"values": rows * cols, "rounds": rounds, "workers": kquants.WORKERS}
    for n in names:
        out[f"{n.lower()}_s"] = round(statistics.median(seconds[n]), 4)
        if n != "Q8_0":
            out[f"{n.lower()}_over_q8_0"] = round(statistics.median(
                k / q for k, q in zip(seconds[n], seconds["Q8_0"])), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 1-layer model and two formats, in seconds")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the demo model")
    parser.add_argument("--tokens", type=int, default=65536, help="perplexity tokens (demo model)")
    parser.add_argument("--big-tokens", type=int, default=4096, help="perplexity tokens (100M model)")
    parser.add_argument("--models", default="demo,big", help="which of demo,big,quantizers to run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the quantizers timing")
    args = parser.parse_args()
    if args.models == "quantizers":
        quantizers = time_quantizers(2048, 2048, args.rounds)
        print(json.dumps({f"quantize_{k}": v for k, v in quantizers.items() if k.endswith("over_q8_0")}
                         | {"quantizers": quantizers}))
        return

    import transformers

    from data_pipeline.prepare.tokenizer import train_bpe

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sampler = Sampler()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_text, held = stdlib_text(300_000 if args.smoke else 6_000_000)
        (root / "held_out.txt").write_text(held)
        vocab = 512 if args.smoke else 4096
        train_bpe([train_text[i:i + 20000] for i in range(0, len(train_text), 20000)], vocab, 2, root / "tok")
        if args.smoke:
            model, loss = train_demo(root / "tok", train_text, 3, 1, 256, 512, vocab)
            result = {"demo": run_export("demo", model, root / "tok", root / "held_out.txt", ["q8_0", "q4_k_m"],
                                         512, root, sampler)}
            result["demo"]["train_loss"] = loss
            result["quantizers"] = time_quantizers(16, 512, 1)
        else:
            result = {}
            if "demo" in args.models:
                model, loss = train_demo(root / "tok", train_text, args.steps, 2, 64, 172, vocab)
                result["demo"] = run_export("demo", model, root / "tok", root / "held_out.txt", ALL,
                                            args.tokens, root, sampler)
                result["demo"]["train_loss"] = loss
            if "big" in args.models:
                big = random_model(12, 768, 2048, 16384, 12)
                result["big"] = run_export("big", big, root / "tok", root / "held_out.txt",
                                           ["f16", "q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"],
                                           args.big_tokens, root, sampler)
            if "quantizers" in args.models:
                result["quantizers"] = time_quantizers(2048, 2048, args.rounds)
    sampler.stop.set()
    ratios: dict[str, Any] = {}
    if "demo" in result:
        demo = {r["format"]: r for r in result["demo"]["formats"]}
        for f in ("q8_0", "q4_k_m"):
            ratios[f"demo_{f}_delta_pct"] = demo[f]["delta_pct"]
    if "big" in result:
        big_rows = {r["format"]: r for r in result["big"]["formats"]}
        for f in ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m"):
            ratios[f"big_{f}_time_over_q8_0"] = round(big_rows[f]["write_s"] / big_rows["q8_0"]["write_s"], 2)
    print(json.dumps({**ratios, **result}))


if __name__ == "__main__":
    main()
