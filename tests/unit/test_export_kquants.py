"""K-quant quantizers against llama.cpp: the bytes its C reference writes (fixture), the gguf package's
dequantizers, the block layouts gguf declares, and llama-quantize's per-tensor mix rules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train.export import kquants
from train.export.gguf_mix import mix, use_more_bits

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kquant_blocks.json"
TYPES = ["Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def test_block_layouts_match_the_gguf_package():
    import gguf

    for name in TYPES:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (kquants.QK_K, kquants.BLOCK_BYTES[name])


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_llama_cpps_reference_quantizer(name):
    """tests/fixtures/make_kquant_fixture.py compiled ggml-quants.c and ran quantize_row_*_K_ref."""
    import gguf

    fixture = json.loads(FIXTURE.read_text())
    x = np.frombuffer(bytes.fromhex(fixture["input_f32_hex"]), dtype=np.float32).reshape(fixture["shape"])
    expected = np.frombuffer(bytes.fromhex(fixture["blocks"][name]), dtype=np.uint8).reshape(len(x), -1)
    got = kquants.K_QUANTIZERS[name](x)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    bad = [i for i in range(len(x)) if not np.array_equal(got[i], expected[i])]
    assert bad == [], f"{name}: blocks {bad} differ from llama.cpp's"
    qtype = gguf.GGMLQuantizationType[name]
    assert np.array_equal(gguf.quants.dequantize(got, qtype), gguf.quants.dequantize(expected, qtype))


def test_round_trip_error_through_the_gguf_dequantizer_orders_by_bits():
    import gguf

    x = np.random.default_rng(0).normal(0, 0.02, (64, 512)).astype(np.float32)
    err = {}
    for name in TYPES:
        q = kquants.quantize(x, gguf.GGMLQuantizationType[name])
        assert q.shape == (64, 512 // 256 * kquants.BLOCK_BYTES[name])
        back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name]).reshape(x.shape)
        err[name] = float(np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
    # measured on Gaussian weights: Q6_K 0.018, Q5_K 0.036, Q4_K 0.07, Q3_K 0.15
    assert err["Q6_K"] < 0.025 < err["Q5_K"] < 0.05 < err["Q4_K"] < 0.1 < err["Q3_K"] < 0.2, err


def test_chunked_quantization_equals_one_pass(monkeypatch):
    import gguf

    x = np.random.default_rng(1).standard_t(3, (6, 1024)).astype(np.float32)
    for name in ("Q4_K", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[name]
        whole = kquants.quantize(x, qtype)
        monkeypatch.setattr(kquants, "CHUNK_VALUES", 512)
        assert np.array_equal(kquants.quantize(x, qtype), whole)
        monkeypatch.setattr(kquants, "CHUNK_VALUES", 1 << 20)
    with pytest.raises(ValueError, match="rows of 100 values cannot be quantized to Q4_K"):
        kquants.quantize(np.zeros((2, 100), np.float32), gguf.GGMLQuantizationType.Q4_K)


def _llama_tensors(n_layer: int, hidden: int, ffn: int, vocab: int = 320) -> list[tuple[str, tuple[int, int]]]:
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                (f"blk.{i}.attn_v.weight", (hidden // 2, hidden)), (f"blk.{i}.attn_output.weight", (hidden, hidden)),
                (f"blk.{i}.ffn_down.weight", (hidden, ffn)), (f"blk.{i}.ffn_up.weight", (ffn, hidden))]
    return out + [("output_norm.weight", (hidden,)), ("output.weight", (vocab, hidden))]


def test_llama_quantize_mix_rules_over_8_layers():
    """llama-quant.cpp: use_more_bits(i, 8) picks layers 0, 3, 6, 7 (first and last eighth, every third)."""
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    types, fell_back = mix("q4_k_m", _llama_tensors(8, 256, 512), 8)
    names = {n: t.name for n, t in types.items()}
    assert [names[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K" if i in (0, 3, 6, 7) else "Q4_K"
                                                                   for i in range(8)]
    assert [names[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [names[f"blk.{i}.attn_v.weight"]
                                                                     for i in range(8)]
    assert names["output.weight"] == "Q6_K" and names["token_embd.weight"] == "Q4_K" and fell_back == []
    s = {n: t.name for n, t in mix("q4_k_s", _llama_tensors(8, 256, 512), 8)[0].items()}
    assert [s[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q5_K"] * 4 + ["Q4_K"] * 4
    assert [s[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q5_K"] + ["Q4_K"] * 7
    q6 = {n: t.name for n, t in mix("q6_k", _llama_tensors(8, 256, 512), 8)[0].items()}
    assert set(q6.values()) == {"Q6_K", "F32"}


def test_rows_that_are_not_multiples_of_256_fall_back_as_llama_quantize_does():
    """tensor_type_fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K -> Q4_0; rows not a multiple
    of 32 -> F16. The output tensor, whose rows do not fit the base type, is Q8_0."""
    types, fell_back = mix("q4_k_m", _llama_tensors(2, 64, 128), 2)
    names = {n: t.name for n, t in types.items()}
    assert names["blk.0.attn_q.weight"] == "Q5_0" and names["blk.1.attn_v.weight"] == "Q8_0"
    assert names["output.weight"] == "Q8_0" and "blk.0.attn_q.weight" in fell_back
    assert {n: t.name for n, t in mix("q5_k_m", _llama_tensors(2, 64, 128), 2)[0].items()}["blk.0.ffn_up.weight"] == "Q5_1"
    assert {n: t.name for n, t in mix("q3_k_m", _llama_tensors(2, 64, 128), 2)[0].items()}["blk.0.ffn_up.weight"] == "Q4_0"
    odd = {n: t.name for n, t in mix("q4_k_m", _llama_tensors(2, 48, 96), 2)[0].items()}
    assert odd["blk.0.attn_q.weight"] == "F16" and odd["blk.0.ffn_down.weight"] == "Q5_0"  # rows of 48 and 96


def test_colsum_adds_rows_in_order_from_zero():
    """The product sums along axis 0 with np.add.reduce: it must add row after row, as the C loop
    `float s = 0; for (...) s += a[i];` does (numpy sums a contiguous axis pairwise instead)."""
    rng = np.random.default_rng(3)
    for columns, rows in [(c, r) for c in (1, 2, 3, 7, 15, 16, 17, 64, 3000) for r in (16, 32)]:
        with np.errstate(over="ignore", invalid="ignore"):  # sums may overflow: to the same inf both ways
            a = (rng.standard_cauchy((rows, columns)) * 10.0 ** rng.integers(-40, 38, (rows, columns))).astype(np.float32)
            a[rng.random(a.shape) < 0.2] = -0.0
            a[:, 0] = -0.0  # all negative zeros: C's sum starting at +0 gives +0
            expected = np.float32(0) + a[0]
            for row in a[1:]:
                expected += row
            assert np.array_equal(kquants._colsum(a).view(np.int32), expected.view(np.int32)), (rows, columns)


def _adversarial_blocks() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    wild = rng.normal(0, 1, (32, 256)) * 10.0 ** rng.integers(-45, 30, (32, 256))  # denormals to 1e30
    scaled = rng.normal(0, 1, (32, 256)) * 10.0 ** rng.integers(-40, 38, (32, 1))  # whole blocks at each scale
    zeros = rng.normal(0, 0.02, (16, 256))
    zeros[rng.random(zeros.shape) < 0.6] = 0
    zeros[rng.random(zeros.shape) < 0.2] = -0.0
    outliers = rng.normal(0, 0.02, (16, 256))
    outliers[:, rng.integers(0, 256, 4)] = rng.normal(0, 20, (16, 4))  # sub-blocks whose scale rounds to 0
    bad = rng.normal(0, 1, (16, 256))
    for value in (np.nan, np.inf, -np.inf):
        bad[rng.random(bad.shape) < 0.01] = value  # rounding by the bit trick
    huge = np.where(rng.random((8, 256)) < 0.5, 3.4e38, -3.4e38) * rng.random((8, 256))
    steps = rng.integers(-3, 4, (16, 256)) * np.array([1, 1e-20, 1e-38, 1e30])[rng.integers(0, 4, (16, 1))]
    return [rng.normal(0, 0.02, (32, 256)), rng.standard_t(2, (32, 256)) * 0.05, rng.standard_cauchy((16, 256)),
            wild, scaled, zeros, outliers, bad, huge, steps, np.abs(rng.normal(0.5, 0.1, (8, 256)))]


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_the_row_major_port_on_adversarial_blocks(name, monkeypatch):
    """The column-major product against the previous port (tests/helpers/kquants_rowmajor.py, which
    matched the C fixture): every byte, through chunks small enough to split a tensor."""
    import gguf

    from tests.helpers import kquants_rowmajor

    monkeypatch.setattr(kquants, "CHUNK_VALUES", 16 * 256)
    x = np.concatenate(_adversarial_blocks()).astype(np.float32)
    with np.errstate(all="ignore"):
        got = kquants.quantize(x, gguf.GGMLQuantizationType[name])
        expected = kquants_rowmajor.K_QUANTIZERS[name](x)
    bad = [i for i in range(len(x)) if not np.array_equal(got[i], expected[i])]
    assert bad == [], f"{name}: blocks {bad} differ from the row-major port"


def test_float_rounding_equals_nearest_int_below_the_bound_only():
    """Within +-EXACT, (v + 1.5*2^23) - 1.5*2^23 then clip equals nearest_int then clip (ties to even
    included); at 2^22 - 0.25 they differ, which is why the bound is 2^21 and checked per trial."""
    e = float(kquants.EXACT)
    edges = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 0.49999997, 15.5, 16.5, -32.5, 31.5, e - 0.5, e - 1], np.float32)
    v = np.concatenate([edges, -edges, np.random.default_rng(5).uniform(-e, e, 100_000).astype(np.float32)])
    v = v[np.abs(v) < kquants.EXACT]
    assert kquants._exact_by_float(v, v)
    for lo, hi in ((0, 15), (0, 31), (-32, 31), (-4, 3), (-(1 << 30), 1 << 30)):
        by_float = kquants._round_clip(v.copy(), lo, hi, True)
        assert np.array_equal(by_float, kquants._round_clip(v.copy(), lo, hi, False)), (lo, hi)
    far = np.array([4194303.75, np.nan], np.float32)
    assert kquants._round_clip(far[:1].copy(), 0, 15, True) != kquants._round_clip(far[:1].copy(), 0, 15, False)
    assert not kquants._exact_by_float(far[:1], far[:1]) and not kquants._exact_by_float(far[1:], far[1:])
