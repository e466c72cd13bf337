"""DPO's loss and gradients against a computation written here with transformers and torch alone
(per pair, unpadded, the formulas spelled out), for sigmoid, ipo and label smoothing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from train.objectives.config import ObjectiveConfig
from train.objectives.dpo import DPOObjective
from train.objectives.reference import FrozenCopy

VOCAB, T = 64, 16


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=0.0, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def pairs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p, c, r = (torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in (3 + i, 2 + i, 4 - i))
        out.append((p, c, r))
    return out


def batch_of(prs) -> dict[str, torch.Tensor]:
    """The loader's layout: chosen rows then rejected rows, right-padded, labels pre-shifted."""
    rows = [p + c for p, c, _ in prs] + [p + r for p, _, r in prs]
    comp = [len(p) for p, _, _ in prs] * 2
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for i, (row, start) in enumerate(zip(rows, comp)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, start - 1:len(row) - 1] = torch.tensor(row[start:])
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).repeat(len(rows), 1)}


def seq_logp(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(completion))


def oracle(policy, ref, prs, beta, loss, ls):
    out = []
    for p, c, r in prs:
        pc, pr = seq_logp(policy, p, c), seq_logp(policy, p, r)
        with torch.no_grad():
            rc, rr = seq_logp(ref, p, c), seq_logp(ref, p, r)
        if loss == "sigmoid":
            z = beta * ((pc - rc) - (pr - rr))
            out.append(-(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z)))
        else:  # TRL's ipo: the log-ratios averaged over each completion's tokens
            h = (pc - rc) / len(c) - (pr - rr) / len(r)
            out.append((h - 1 / (2 * beta)) ** 2)
    return torch.stack(out).mean()


def test_policy_equal_to_reference_gives_ln2():
    policy = tiny_llama(0)
    obj = DPOObjective(ObjectiveConfig(kind="dpo"), FrozenCopy(copy.deepcopy(policy)))
    b = batch_of(pairs())
    loss = obj.loss_sum(policy, b) / obj.weight(b)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    m = obj.metrics(torch.device("cpu"))
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert m["logps/chosen"] < 0


@pytest.mark.parametrize("loss,ls", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.2)])
def test_loss_and_gradients_equal_an_independent_computation(loss, ls):
    policy, ref = tiny_llama(0), tiny_llama(1)
    twin = copy.deepcopy(policy)
    prs = pairs()
    beta = 0.3
    obj = DPOObjective(ObjectiveConfig(kind="dpo", beta=beta, loss=loss, label_smoothing=ls), FrozenCopy(ref))
    b = batch_of(prs)
    ours = obj.loss_sum(policy, b) / obj.weight(b)
    ours.backward()
    expected = oracle(twin, ref, prs, beta, loss, ls)
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(ours.item() - math.log(2)) > 1e-3  # the reference really differs
    for (name, a), (_, e) in zip(policy.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-7, msg=name)
    m = obj.metrics(torch.device("cpu"))
    with torch.no_grad():
        margins = [beta * ((seq_logp(twin, p, c) - seq_logp(ref, p, c)) - (seq_logp(twin, p, r) - seq_logp(ref, p, r)))
                   for p, c, r in prs]
    assert m["rewards/margins"] == pytest.approx(float(torch.stack(margins).mean()), rel=1e-4)
    assert m["rewards/accuracies"] == pytest.approx(float((torch.stack(margins) > 0).float().mean()))


def test_losses_are_torch_logsigmoid_forms():
    """Guards the formula file itself: the sigmoid loss at label smoothing e is the cDPO mix."""
    from train.objectives.dpo_math import pair_losses

    z = torch.tensor([0.7, -1.2])
    zero = torch.zeros(2)
    out = pair_losses(z, zero, zero, zero, beta=2.0, loss="sigmoid", label_smoothing=0.1).losses
    torch.testing.assert_close(out, -0.9 * F.logsigmoid(2 * z) - 0.1 * F.logsigmoid(-2 * z))


@pytest.mark.parametrize("adapter,reference,base_dtype,want", [
    ("lora", "model", "auto", None), ("lora", "auto", "auto", None),
    ("none", "model", "auto", torch.float32), ("none", "auto", "bf16", torch.bfloat16)])
def test_reference_kind_and_storage_dtype(tmp_path, adapter, reference, base_dtype, want):
    """Under an adapter, `auto` and `model` alike are the base with the adapter disabled (no second
    copy); full fine-tuning builds a frozen copy from the meta model, in `model.base_dtype`
    (`auto` on a from-config model: its fp32 init), fully materialized for DDP on one rank, its
    bytes in the startup notes."""
    from types import SimpleNamespace

    from tests.helpers import compose_train
    from train.config import load_config
    from train.dist import DistInfo
    from train.model import build_meta_model
    from train.objectives.build import build_objective
    from train.objectives.reference import AdapterOff
    from train.startup import Phases

    cfg = load_config(compose_train(["model=tiny", f"run.dir={tmp_path}", "objective=dpo", f"adapter={adapter}",
                                     f"objective.reference={reference}", f"model.base_dtype={base_dtype}",
                                     "data=webdataset", f"data.urls={tmp_path}"]),
                      world_size=1)
    phases = Phases()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    obj = build_objective(cfg, build_meta_model(cfg.model, 256), info, SimpleNamespace(pairs=True), phases)
    if want is None:
        assert isinstance(obj.reference, AdapterOff) and "reference" not in phases.notes
        return
    ref = obj.reference.module
    assert {(p.dtype, p.requires_grad, p.is_meta) for p in ref.parameters()} == {(want, False, False)}
    note = phases.notes["reference"]
    assert note["rank_bytes"] == [note["bytes_whole"]] == [sum(p.numel() for p in ref.parameters()) * want.itemsize]
