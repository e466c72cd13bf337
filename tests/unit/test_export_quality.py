"""Quantized GGUF exports and the perplexity each format loses (quality.json), on a trained tiny Llama
whose rows are multiples of 256 so that every K-quant applies (hidden 256, intermediate 512)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.export_checkpoints import TEXTS, make_checkpoint, make_tokenizer
from train.export.config import ExportConfig
from train.export.hf_export import export_checkpoint

FORMATS = ["f16", "q8_0", "q4_0", "q4_k_m", "q3_k_m"]
SEQ, TOKENS = 32, 2048


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a 1.3M-parameter Llama trained on the tokenizer's text until it sits in a minimum
    (a last stretch at a tenth of the learning rate), so that weight noise can only cost loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("quality")
    tok_dir = make_tokenizer(root / "tokenizer")
    text = " ".join(TEXTS)
    ids = torch.tensor(AutoTokenizer.from_pretrained(tok_dir).encode(text))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_cache=False, bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        for group in opt.param_groups:
            group["lr"] = 3e-3 if step < 45 else 3e-4
        starts = torch.randint(0, ids.numel() - SEQ - 1, (8,))
        batch = torch.stack([ids[s:s + SEQ + 1] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0  # it learned: quantization has a loss to lose
    (root / "eval.txt").write_text(text)
    ckpt = make_checkpoint(root / "run", tokenizer_dir=str(tok_dir), model=model)
    return ckpt, root / "eval.txt", ids


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    ckpt, text, _ = trained
    out = tmp_path_factory.mktemp("exports") / "step_2"
    cfg = ExportConfig(kind="hf", dtype="fp32", gguf=FORMATS, quality_text=str(text), quality_tokens=TOKENS,
                       quality_seq_len=SEQ, verify_new_tokens=0)
    return out, export_checkpoint(ckpt.path, out, cfg)


def test_fp32_perplexity_is_the_models_own_loss_and_quantization_costs_in_order(trained, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, text, _ = trained
    out, meta = exported
    quality = json.loads((out / "quality.json").read_text())
    assert quality == json.loads(json.dumps(meta["quality"]))
    assert quality["tokens"] == TOKENS and quality["source"].startswith("text file")
    # oracle: transformers' own shifted-label loss of the checkpoint's fp32 model on the same windows
    ids = AutoTokenizer.from_pretrained(out).encode(text.read_text(), add_special_tokens=False)[: TOKENS + 1]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    total = count = 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ):
            window = torch.tensor(ids[start:start + SEQ + 1])[None]
            n = window.shape[1] - 1
            total += model(input_ids=window, labels=window).loss.item() * n
            count += n
    assert count == TOKENS
    assert quality["reference"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    ppl = {r["format"]: r["perplexity"] for r in quality["formats"]}
    assert ppl["hf-fp32"] == pytest.approx(quality["reference"]["perplexity"], rel=1e-6)
    # "in expectation": a tiny model's loss moves a few 1e-4 either way under 8- and 4-bit noise
    # (first-order terms of random sign); the coarser K-quant mixes must cost clearly more
    tol = 5e-4 * ppl["gguf-f16"]
    assert ppl["gguf-f16"] < ppl["gguf-q8_0"] + tol
    assert ppl["gguf-q8_0"] <= ppl["gguf-q4_0"] + tol
    assert ppl["gguf-q8_0"] < ppl["gguf-q4_k_m"]
    assert ppl["gguf-q4_k_m"] < ppl["gguf-q3_k_m"]
    rows = {r["format"]: r for r in quality["formats"]}
    assert abs(rows["gguf-q8_0"]["delta_pct"]) < 0.5 and 0 < rows["gguf-q4_k_m"]["delta_pct"] < 5
    assert rows["gguf-q4_k_m"]["bits_per_weight"] < rows["gguf-q8_0"]["bits_per_weight"] < 8.6
    assert all(r["passed"] for r in quality["formats"]) and quality["max_delta_pct"] is None
    readme = (out / "README.md").read_text()
    assert "| gguf-q4_k_m | `model-q4_k_m.gguf` |" in readme and "Quality of each format" in readme


def test_every_gguf_has_llama_cpp_mix_types_and_a_modelfile(exported):
    import gguf

    out, meta = exported
    assert [g["file"] for g in meta["gguf_files"]] == [f"model-{f}.gguf" for f in FORMATS]
    types = {f: {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / f"model-{f}.gguf").tensors}
             for f in FORMATS}
    for f in FORMATS:
        assert types[f]["blk.0.attn_norm.weight"] == types[f]["output_norm.weight"] == "F32"
        assert (out / f"Modelfile.{f}").read_text().splitlines()[-1] == f"FROM ./model-{f}.gguf"
        assert f"Modelfile.{f}" in meta["files"]
    assert types["f16"]["blk.1.ffn_down.weight"] == "F16"
    assert set(types["q8_0"].values()) == {"F32", "Q8_0"}
    # Q4_0 (llama-quantize): everything Q4_0 but output.weight, which gets Q6_K
    assert types["q4_0"]["output.weight"] == "Q6_K" and types["q4_0"]["blk.0.attn_v.weight"] == "Q4_0"
    # Q4_K_M on 2 layers: use_more_bits(i, 2) is true for i = 1 only
    q4km = types["q4_k_m"]
    assert (q4km["blk.0.attn_v.weight"], q4km["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (q4km["blk.0.ffn_down.weight"], q4km["blk.1.ffn_down.weight"]) == ("Q4_K", "Q6_K")
    assert q4km["output.weight"] == "Q6_K" and q4km["token_embd.weight"] == q4km["blk.0.attn_q.weight"] == "Q4_K"
    # Q3_K_M: attn_v Q5_K in the first 2 layers, ffn_down and attn_output Q4_K, the rest Q3_K
    q3km = types["q3_k_m"]
    assert q3km["blk.1.attn_v.weight"] == "Q5_K" and q3km["blk.0.ffn_down.weight"] == "Q4_K"
    assert q3km["blk.0.attn_output.weight"] == "Q4_K" and q3km["blk.0.ffn_up.weight"] == "Q3_K"
    assert meta["gguf_files"][3]["fallback_tensors"] == []
    assert "no chat template" in (out / "Modelfile.q8_0").read_text()


def test_a_format_over_quality_max_delta_is_refused_and_the_previous_export_stays(trained, exported):
    from train.export.files import verify_dir
    from train.export.quality import QualityError

    ckpt, text, _ = trained
    out, _ = exported
    before = (out / "export.json").read_bytes()
    cfg = ExportConfig(kind="hf", gguf=["q3_k_m"], quality_text=str(text), quality_tokens=512, quality_seq_len=SEQ,
                       quality_max_delta=0.01, verify=False)
    with pytest.raises(QualityError, match=r"gguf-q3_k_m \+[0-9.]+%.*nothing was published"):
        export_checkpoint(ckpt.path, out, cfg)
    assert (out / "export.json").read_bytes() == before and verify_dir(out)["files_checked"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["step_2"]


def test_quality_defaults_to_the_runs_validation_split(tmp_path):
    """quality=null and a webdataset run with a val split: measured on the loader the trainer's eval reads."""
    import yaml

    from tests.support.data import make_shards

    shards = make_shards(tmp_path, sizes=(6,), val_sizes=(8,), vocab_size=320, content="random", max_len=60)
    ckpt = make_checkpoint(tmp_path / "run")
    state_path = ckpt.path / "trainer_state.json"
    (ckpt.path / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"kind": "webdataset", "urls": str(shards.root)}, "trainer": {"seq_len": 16}}))
    state = json.loads(state_path.read_text())
    state["files"]["config.yaml"] = (ckpt.path / "config.yaml").stat().st_size
    state_path.write_text(json.dumps(state))
    meta = export_checkpoint(ckpt.path, tmp_path / "e", ExportConfig(kind="hf", quality_tokens=200, verify=False))
    quality = meta["quality"]
    assert quality["source"] == "the run's validation split" and 0 < quality["tokens"]
    assert [r["format"] for r in quality["formats"]] == ["hf-bf16"]
    assert abs(quality["formats"][0]["delta_pct"]) < 1
    synthetic = export_checkpoint(make_checkpoint(tmp_path / "syn").path, tmp_path / "s",
                                  ExportConfig(kind="hf", verify=False))
    assert synthetic["quality"] is None and not (tmp_path / "s" / "quality.json").exists()


def test_modelfile_translates_known_chat_templates_and_omits_others():
    from data_pipeline.prepare.chat import DEFAULT_CHAT_TEMPLATE
    from tests.support.data import LLAMA3_CHAT_TEMPLATE
    from train.export.modelfile import modelfile_text

    chatml, info = modelfile_text("model-q4_k_m.gguf", DEFAULT_CHAT_TEMPLATE)
    assert info["chat_template"] == "chatml" and chatml.startswith("FROM ./model-q4_k_m.gguf\nTEMPLATE \"\"\"")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in chatml and 'PARAMETER stop "<|im_end|>"' in chatml
    llama3, info = modelfile_text("m.gguf", LLAMA3_CHAT_TEMPLATE)
    assert info["chat_template"] == "llama3" and 'PARAMETER stop "<|eot_id|>"' in llama3
    other, info = modelfile_text("m.gguf", "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    assert info["chat_template"] is None and "\nTEMPLATE" not in other and other.startswith("# the tokenizer's chat")
