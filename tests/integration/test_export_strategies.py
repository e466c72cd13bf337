"""Exports from real training checkpoints of every engine (2 gloo ranks via torchrun).

One tiny 2-step run per strategy, on a corpus prepared by `data_pipeline.prepare` (so the
checkpoint names the manifest's BPE tokenizer), is shared by all tests of this module. The
export must equal
the engine's own consolidation of the checkpoint (torch's dcp_to_torch_save for DDP/FSDP,
DeepSpeed's zero_to_fp32 for ZeRO), every strategy must export the same model (they train
identically), and an export made by the training loop must equal the offline export.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, run_train
from tests.helpers.export_checkpoints import export_tensors
from train.export.config import ExportConfig
from train.export.hf_export import export_checkpoint
from train.metrics import read_metrics

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small JSONL corpus prepared into WebDataset shards with a trained byte-level BPE."""
    import random

    from data_pipeline.prepare import prepare
    from data_pipeline.prepare.config import (
        PrepareConfig,
        SourceConfig,
        TokenizerConfig,
    )

    root = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while export hooks write checkpoints".split()
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) for _ in range(200)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(source=SourceConfig(path=str(root / "corpus.jsonl")), out=str(root / "data"),
                          tokenizer=TokenizerConfig(train=True, vocab_size=320), num_proc=1, progress=False))
    return root / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """strategy -> run dir, trained on first use (2 ranks, 2 steps, checkpoint + export at step 2)."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("export_runs")

    def get(strategy: str) -> Path:
        if strategy not in runs:
            run_dir = root / strategy
            run_train([*TINY, f"strategy={strategy}", "trainer.max_steps=2", "checkpoint.every_steps=2",
                       "data=webdataset", f"data.urls={corpus}", "data.num_workers=0",
                       "export=hf", "export.dtype=fp32", "export.every_steps=2", "export.gguf=q8_0",
                       f"run.dir={run_dir}"],
                      nproc=2, timeout=240)
            runs[strategy] = run_dir
        return runs[strategy]

    return get


@pytest.fixture(scope="module")
def offline(trained, tmp_path_factory):
    """strategy -> (checkpoint dir, offline export dir, metadata)."""
    done: dict[str, tuple[Path, Path, dict]] = {}
    root = tmp_path_factory.mktemp("offline_exports")

    def get(strategy: str) -> tuple[Path, Path, dict]:
        if strategy not in done:
            ckpt = trained(strategy) / "checkpoints" / "step_00000002"
            out = root / strategy
            cfg = ExportConfig(kind="hf", dtype="fp32", gguf="q8_0" if strategy == "zero3" else None)
            done[strategy] = (ckpt, out, export_checkpoint(ckpt, out, cfg))
        return done[strategy]

    return get


def engine_consolidation(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict as the engine's own tools consolidate it."""
    if (ckpt / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed")))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "model", tmp / "full.pt")
    return torch.load(tmp / "full.pt", weights_only=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_equals_the_engines_own_consolidation(offline, strategy, tmp_path):
    ckpt, out, meta = offline(strategy)
    full = engine_consolidation(ckpt, tmp_path)
    exported = export_tensors(out)
    assert set(exported) <= set(full) and len(exported) == 21
    for name, t in exported.items():
        assert torch.equal(t, full[name].float()), f"{strategy}: {name} differs from the engine's consolidation"
    assert meta["strategy"]["name"] == strategy and meta["world_size"] == 2 and meta["step"] == 2
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_diff"] == 0.0


@pytest.mark.timeout(600)
def test_every_strategy_exports_the_same_model(offline):
    base = export_tensors(offline("ddp")[1])
    for strategy in STRATEGIES[1:]:
        other = export_tensors(offline(strategy)[1])
        worst = max((other[k] - base[k]).abs().max().item() for k in base)
        assert worst < 1e-5, f"{strategy} export differs from ddp's by {worst}"
    assert max(t.abs().max().item() for t in base.values()) > 0.01


@pytest.mark.timeout(300)
def test_export_of_a_real_run_carries_the_manifest_tokenizer_into_hf_and_gguf(offline, corpus):
    import gguf
    from transformers import AutoTokenizer

    ckpt, out, meta = offline("zero3")
    manifest_tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    exported = AutoTokenizer.from_pretrained(out)
    text = "the lazy fox writes export hooks"
    assert exported(text)["input_ids"] == manifest_tok(text)["input_ids"]
    assert meta["tokenizer"]["source"] == str((corpus / "tokenizer").resolve())
    assert meta["tokens"] == json.loads((ckpt / "trainer_state.json").read_text())["tokens"] > 0
    assert meta["gguf"]["tokenizer"] == "gpt2" and meta["gguf"]["special_ids"]["eos"] == manifest_tok.eos_token_id
    reader = gguf.GGUFReader(out / meta["gguf"]["file"])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == json.loads((out / "config.json").read_text())["vocab_size"]
    assert isinstance(meta["verification"]["generated_text"], str)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_made_during_training_equals_the_offline_export(trained, offline, strategy):
    run_dir = trained(strategy)
    live = run_dir / "exports" / "step_00000002"
    assert live.is_dir(), f"export=hf export.every_steps=2 wrote no {live}"
    _, out, _ = offline(strategy)
    live_tensors, offline_tensors = export_tensors(live), export_tensors(out)
    assert live_tensors.keys() == offline_tensors.keys()
    for name in live_tensors:
        assert torch.equal(live_tensors[name], offline_tensors[name]), name
    meta = json.loads((live / "export.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["reference"].startswith("live training model")
    assert meta["verification"]["max_abs_diff"] < 1e-5
    timings = [m for m in read_metrics(run_dir) if "export_time_s" in m]
    assert [m["step"] for m in timings] == [2] and timings[0]["export_time_s"] > 0
    # the prepared corpus has a validation split: the training hook measured every format on it
    quality = json.loads((live / "quality.json").read_text())
    assert quality["source"] == "the run's validation split" and quality["tokens"] > 0
    assert [r["format"] for r in quality["formats"]] == ["hf-fp32", "gguf-q8_0"]
    assert timings[0]["export/ppl_delta_pct/gguf-q8_0"] == quality["formats"][1]["delta_pct"]


@pytest.mark.timeout(300)
def test_bf16_zero1_exports_the_fp32_master_weights(tmp_path):
    """bf16 training keeps bf16 weights in the module and fp32 masters in DeepSpeed's BF16_Optimizer
    files (no zero_stage key, which zero_to_fp32 rejects): the fp32 export must carry the masters."""
    run_dir = tmp_path / "run"
    run_train([*TINY, "strategy=zero1", "trainer.dtype=bf16", "trainer.max_steps=2", "export=hf",
               "export.dtype=bf16", f"run.dir={run_dir}"], nproc=2, timeout=240)
    live = run_dir / "exports" / "step_00000002"
    meta = json.loads((live / "export.json").read_text())
    assert meta["verification"]["reference"] == "live training model (bf16)"
    assert meta["verification"]["max_abs_diff"] == 0.0  # bf16 export == the live bf16 module
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert list((ckpt / "deepspeed" / "state").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    export_checkpoint(ckpt, tmp_path / "fp32", ExportConfig(kind="hf", dtype="fp32"))
    master, bf16 = export_tensors(tmp_path / "fp32"), export_tensors(live)
    for name, t in master.items():
        assert t.dtype == torch.float32 and torch.equal(t.to(torch.bfloat16), bf16[name]), name
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in master.values()), \
        "fp32 export holds only bf16-representable values: it read the bf16 module, not the masters"
