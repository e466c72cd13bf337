"""Preference pairs for DPO tests: records in TRL's three forms, and `prepare mode=preference`
run in-process."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.data import sample_conversations


def sample_pairs(n: int, *, seed: int = 0, form: str = "conversational") -> list[dict]:
    """`n` preference records: conversational, standard (strings) or implicit (full conversations)."""
    rng = np.random.default_rng(seed)
    convs = sample_conversations(2 * n, seed=seed, max_words=6)
    out = []
    for i in range(n):
        msgs = convs[2 * i]["messages"]
        prompt, good = msgs[:-1], msgs[-1]["content"]
        bad = convs[2 * i + 1]["messages"][-1]["content"]
        if bad == good:
            bad = good + " " + str(int(rng.integers(100)))
        if form == "conversational":
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})
        elif form == "implicit":
            out.append({"chosen": prompt + [{"role": "assistant", "content": good}],
                        "rejected": prompt + [{"role": "assistant", "content": bad}]})
        else:
            out.append({"prompt": " ".join(m["content"] for m in prompt) + " answer:",
                        "chosen": " " + good, "rejected": " " + bad})
    return out


def prepare_pairs(out: Path, source: Path, tokenizer_dir: Path, **overrides) -> dict:
    """`prepare mode=preference` in-process (one tokenizer process); overrides as dotted keys."""
    from data_pipeline.prepare import prepare
    from data_pipeline.prepare.config import load_prepare_config

    raw: dict = {"mode": "preference", "source": {"path": str(source)}, "out": str(out), "num_proc": 1,
                 "progress": False, "tokenizer": {"path": str(tokenizer_dir)},
                 # the tests' small files drop a large share on purpose (each bad case counted)
                 "prepare": {"max_dropped_frac": 1.0}}
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return prepare(load_prepare_config(raw))
