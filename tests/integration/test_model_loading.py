"""Meta-device start-up (issue 17): a bf16 model saved in several safetensors files, loaded with
model=hf_local, gives the single-process step-1 loss under every engine (sharded or replicated); the start-up
record is written; a requeue of an adapter run does not read the base's weights."""
from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import losses, run_train
from train.metrics import read_metrics

COMMON = ("model=hf_local", "trainer.seq_len=32", "trainer.log_every=1", "trainer.max_steps=2",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "checkpoint.at_end=false")
STARTUP_KEYS = {"build_s", "load_s", "engine_s", "first_step_s", "total_s", "peak_rss_bytes_before_first_step",
                "peak_rss_bytes_after_first_step", "rank_peak_rss_bytes_before_first_step",
                "rank_peak_rss_bytes_after_first_step", "phase_peak_rss_bytes"}


def save_sharded_bf16(out: Path, layers: int = 3, hidden: int = 64, vocab: int = 256) -> Path:
    """A small random Llama saved as bf16 safetensors in several files (with an index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="60KB")
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    return save_sharded_bf16(tmp_path_factory.mktemp("bf16_base"))


def trainable_line(out) -> str:
    """The start line's `full: 0.12M trainable of 0.12M` / `lora r=16: ...` part."""
    found = re.findall(r"\| ((?:full|lora r=\d+): \S+ trainable of \S+) \|", out.stdout + out.stderr)
    assert len(found) == 1, out.stderr[-3000:]
    return found[0]


@pytest.fixture(scope="module")
def single(bf16_base, tmp_path_factory):
    """1-process references (accumulation 2), one per adapter setting: step 1's loss and the start
    line's trainable count."""
    cache: dict[str, tuple[float, str]] = {}

    def get(adapter: str) -> tuple[float, str]:
        if adapter not in cache:
            run_dir = tmp_path_factory.mktemp(f"single-{adapter}")
            out = run_train([*COMMON, f"model.path={bf16_base}", f"adapter={adapter}", "strategy=ddp",
                             f"run.dir={run_dir}"])
            cache[adapter] = losses(run_dir)[1], trainable_line(out)
        return cache[adapter]

    return get


def test_materialized_model_equals_the_files(bf16_base):
    """build_model (meta build + one tensor at a time) holds exactly the checkpoint's values, in
    fp32; from-config init is seeded per module, so it does not depend on the order or sharding."""
    from safetensors.torch import load_file

    from train.config import ModelConfig
    from train.model import build_meta_model, build_model, weight_source

    model = build_model(ModelConfig(kind="hf_local", path=str(bf16_base)), None, 0)
    files = {}
    for f in bf16_base.glob("*.safetensors"):
        files.update(load_file(f))
    params = dict(model.named_parameters())
    assert params.keys() == files.keys()
    for name, tensor in files.items():
        assert params[name].dtype == torch.float32 and torch.equal(params[name], tensor.float()), name

    cfg = ModelConfig(vocab_size=100)
    meta = build_meta_model(cfg, None)
    weights = weight_source(cfg, meta, seed=5)
    rows = weights.read("model.layers.1.mlp.up_proj.weight", (3, 9))  # a shard's rows, read first
    full = build_model(cfg, None, 5).model.layers[1].mlp.up_proj.weight
    assert torch.equal(rows, full[3:9].detach()) and 0.015 < float(full.detach().std()) < 0.025


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy,adapter", [(s, a) for s in ("fsdp", "zero3", "ddp", "zero2") for a in ("lora", "none")])
def test_engines_match_one_process(strategy, adapter, bf16_base, single, tmp_path):
    out = run_train([*COMMON, f"model.path={bf16_base}", f"adapter={adapter}", f"strategy={strategy}",
                     f"run.dir={tmp_path}"], nproc=2, timeout=600)
    # A bf16 base computes in fp32 on CPU under every engine: the same products, summed in another order.
    rel = 2e-3 if adapter == "lora" else 1e-5
    loss, trainable = single(adapter)
    assert losses(tmp_path)[1] == pytest.approx(loss, rel=rel)
    # the start line counts the model, not a rank's partition (ZeRO-3 once logged "0 trainable of 0")
    assert trainable_line(out) == trainable and not trainable.startswith(("full: 0 ", "lora r=16: 0 "))
    # a frozen bf16 projection (train/upcast.py) returns a tensor of its own: FSDP2 warned about views
    assert "returned a view tensor" not in out.stdout + out.stderr
    startup = [r["startup"] for r in read_metrics(tmp_path) if "startup" in r]
    assert len(startup) == 1 and STARTUP_KEYS <= startup[0].keys(), startup
    assert len(startup[0]["rank_peak_rss_bytes_before_first_step"]) == 2
    assert startup[0]["load_s"] > 0


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory) -> Path:
    """Blocks of 5.5 MB in bf16, past ONE_BLOCK_FROM: FSDP2 on CPU ranks gathers one unit at a time
    (train/strategies/parallelize.py), each frozen projection a unit gathered into its weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2))
    out = tmp_path_factory.mktemp("wide_base")
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="4MB")
    return out


@pytest.fixture(scope="module")
def wide_single(wide_base, tmp_path_factory) -> dict[int, float]:
    """One process's losses on the wide base (no sharding: neither path below is taken)."""
    run_dir = tmp_path_factory.mktemp("wide-one")
    out = run_train([*COMMON, f"model.path={wide_base}", "adapter=lora", "strategy=ddp", f"run.dir={run_dir}"])
    assert "one unit gathered at a time" not in out.stdout + out.stderr
    return losses(run_dir)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy,ac,says", [
    ("fsdp", "false", "one unit gathered at a time, 14 frozen projections in units of their own"),
    ("fsdp", "true", "one unit gathered at a time, 14 frozen projections in units of their own"),
    ("zero3", "true", "frozen modules released right after their recomputation")])
def test_cpu_ranks_one_weight_at_a_time_match_one_process(strategy, ac, says, wide_base, wide_single, tmp_path):
    """LoRA on 2 CPU ranks holding one frozen weight at a time: FSDP2 with each frozen projection a unit
    gathered into its weight (and resharded after an activation-checkpointing recompute), ZeRO-3 releasing
    each recomputed frozen module at once (train/strategies/deepspeed.py `_release_after_recompute`), give
    one process's losses at both steps; the start-up log says the path ran."""
    out = run_train([*COMMON, f"model.path={wide_base}", "adapter=lora", f"strategy={strategy}",
                     f"trainer.activation_checkpointing={ac}", f"run.dir={tmp_path}"], nproc=2, timeout=600)
    assert says in out.stdout + out.stderr
    got = losses(tmp_path)
    assert got.keys() == wide_single.keys() == {1, 2}
    for step, want in wide_single.items():
        assert got[step] == pytest.approx(want, rel=2e-5), (step, got, wide_single)


def test_requeue_does_not_read_the_base_weights(bf16_base, monkeypatch):
    """The fingerprint reads file sizes and safetensors headers, not tensors (a 70B requeue would
    otherwise read 140 GB); the full hash only under checkpoint.verify=true."""
    from train.adapters.lora import base_content_digest, base_fingerprint
    from train.config import ModelConfig

    cfg = ModelConfig(kind="hf_local", path=str(bf16_base))
    weight_bytes = sum(f.stat().st_size for f in bf16_base.glob("*.safetensors"))
    read = {"bytes": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    first = base_fingerprint(cfg, {}, 0)
    assert first.startswith("files:") and first == base_fingerprint(cfg, {}, 0)
    cheap = read["bytes"]
    assert 0 < cheap < weight_bytes / 10, (cheap, weight_bytes)
    digest = base_content_digest(cfg)
    assert digest.startswith("sha256:") and read["bytes"] - cheap >= weight_bytes  # the twin: verify reads all
