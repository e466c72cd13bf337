"""`objective.reference=precompute`: the reference log-probs of every pair, computed once before
training and stored in the run directory, so that no reference model is held while training.

    RUN_DIR/reference_logps/{split}.npy   float32 [pairs, 2]: (chosen, rejected) per global doc id
    RUN_DIR/reference_logps/{split}.json  the data fingerprint and pair count it was computed for
    RUN_DIR/reference_logps/{split}/chunk_NNNNNN.npy   partial results while the pass runs

The pass reads the split in table order (data_pipeline/read/pairs.py) with the starting model,
before any step; a killed pass resumes at its first missing chunk. Every rank runs every forward
(so sharded engines, whose forwards are collective, stay in step) and rank 0 writes: the pass
costs one epoch of forwards, without the trade-off of splitting ragged chunks over ranks.
A table whose fingerprint differs from the data's is refused, never silently reused.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from data_pipeline.fsutil import atomic_write, atomic_write_text
from data_pipeline.read.pairs import pairs_in_table_order
from data_pipeline.read.shard_table import build_table
from train import dist as d
from train.objectives.dpo import model_logps

CHUNK_BATCHES = 16


def _paths(run_dir: Path, split: str) -> tuple[Path, Path, Path]:
    root = Path(run_dir) / "reference_logps"
    return root / f"{split}.npy", root / f"{split}.json", root / split


def load_or_compute(strategy, cfg, info, run_dir: Path, split: str, trained: bool) -> np.ndarray:
    """The [pairs, 2] table of `split`; computed with `strategy.model` unless already complete.
    `trained`: the run already has checkpoints, so the model is no longer the reference."""
    table = build_table(cfg.data, split)
    final, meta_path, part = _paths(run_dir, split)
    n = int(table.doc_base[-1])
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("data_fingerprint") != table.fingerprint or meta.get("pairs") != n:
            raise ValueError(f"{meta_path} holds reference log-probs of other data (fingerprint "
                             f"{meta.get('data_fingerprint')}, {meta.get('pairs')} pairs; the data has "
                             f"{table.fingerprint}, {n}): use a new run.dir for new data, or delete "
                             f"{final.parent} to recompute (only before training has started)")
        return np.load(final)
    if trained:
        raise ValueError(f"{final} is missing but {run_dir} already has checkpoints: the reference "
                         "log-probs can only be computed from the starting model; use a new run.dir")
    bsz = cfg.trainer.micro_batch_size
    per_chunk = bsz * CHUNK_BATCHES
    chunks = -(-n // per_chunk)
    if info.is_main:
        part.mkdir(parents=True, exist_ok=True)
    d.barrier()
    for c in range(chunks):
        path = part / f"chunk_{c:06d}.npy"
        done = d.broadcast_object(path.is_file() if info.is_main else None)
        if done:
            continue
        out = []
        batches = pairs_in_table_order(table, bsz, cfg.trainer.seq_len, first=c * per_chunk)
        with strategy.forward_context():
            for _, batch in zip(range(CHUNK_BATCHES), batches):
                batch = {k: v.to(info.device) for k, v in batch.items()}
                lp = model_logps(strategy.model, batch).float().cpu()
                b = lp.numel() // 2
                out.append(torch.stack([lp[:b], lp[b:]], dim=1).numpy())
        with contextlib.suppress(Exception):
            batches.close()
        if info.is_main:
            _save(path, np.concatenate(out))
    if info.is_main:
        logps = np.concatenate([np.load(part / f"chunk_{c:06d}.npy") for c in range(chunks)])
        assert logps.shape == (n, 2), logps.shape
        _save(final, logps)
        atomic_write_text(meta_path, json.dumps({"data_fingerprint": table.fingerprint, "pairs": n,
                                                 "split": split}) + "\n")
    d.barrier()
    return np.load(final)


def _save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


class Precomputed:
    """Reference log-probs looked up by the batch's `pair_index`; `split` picks the table."""

    def __init__(self, tables: dict[str, np.ndarray]) -> None:
        self.tables = {k: torch.from_numpy(v) for k, v in tables.items()}
        self.split = "train"

    def logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.tables[self.split][batch["pair_index"].cpu()]
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
