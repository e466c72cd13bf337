"""Consolidate fp32 weights from a DeepSpeed ZeRO-1/2/3 checkpoint one tensor at a time.

The fp32 master weights live in the per-rank optimizer files (`*_optim_states.pt`), flattened
and partitioned: ZeRO-1/2 split each param group's flat vector into equal rank slices; ZeRO-3
splits every parameter into ceil(numel / world) pieces. The model-states files give names and
shapes. deepspeed.utils.zero_to_fp32 knows the layout, but its ZeRO-1/2 path concatenates
every partition (the whole model in memory) and it always unpickles with weights_only=False;
so this module parses the files itself (memory-mapped, weights_only=True with DeepSpeed's few
classes allow-listed) and reuses zero_to_fp32's `GatheredTensor` for ZeRO-3.

Why not weights_only everywhere without help: the optimizer files pickle DeepSpeed objects
(LossScaler, ZeroStageEnum, fragment_address). They are allow-listed below; any other global
raises a CheckpointError listing it instead of silently executing pickle code.
"""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from train.checkpoint_layout import read_text
from train.export.weights import (
    CheckpointError,
    canonical_name,
    release_pages,
)


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path) -> dict[str, Any]:
    """torch.load memory-mapped with weights_only=True (DeepSpeed's classes allow-listed)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        raise CheckpointError(f"{path} pickles Python objects outside the allow-list {unsafe}: "
                              "refusing to unpickle them (weights_only). Convert it with "
                              "DeepSpeed's zero_to_fp32.py if you trust the file.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # torch's zip reader on a torn file
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:200]}): "
                              "the file is truncated or corrupt; export another checkpoint") from exc


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(ds_dir: Path, pattern: str) -> list[Path]:
    files = sorted(ds_dir.glob(pattern), key=_natural)
    if not files:
        raise CheckpointError(f"{ds_dir} has no {pattern} files: the DeepSpeed checkpoint is incomplete")
    return files


class ZeroWeights:
    """WeightSource over `CHECKPOINT/deepspeed` (engine.save_checkpoint(save_dir, tag))."""

    def __init__(self, root: Path):
        root = Path(root)
        latest = root / "latest"  # DeepSpeed's own tag file (engine.save_checkpoint), not checkpoints/latest
        tag = read_text(latest, limit=4096).strip() if latest.is_file() else None
        tags = [d for d in root.iterdir() if d.is_dir()] if tag is None else [root / tag]
        if len(tags) != 1 or not tags[0].is_dir():
            raise CheckpointError(f"{root}: cannot tell which DeepSpeed tag to read (no 'latest' file "
                                  f"and directories {sorted(d.name for d in tags)})")
        self.dir = tags[0]
        optim = [_load(f)["optimizer_state_dict"] for f in _files(self.dir, "*_optim_states.pt")]
        # BF16_Optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation) writes no
        # zero_stage; its flat fp32 partitions have the ZeRO-1 layout.
        if "zero_stage" not in optim[0] and "single_partition_of_fp32_groups" not in optim[0]:
            raise CheckpointError(f"{self.dir}: optimizer files hold no ZeRO fp32 partitions")
        self.stage = int(optim[0].get("zero_stage", 1))
        self.world = len(optim)
        counts = optim[0]["partition_count"]
        expected = max(counts) if isinstance(counts, list) else int(counts)
        if expected != self.world:
            raise CheckpointError(f"{self.dir}: {self.world} optimizer files but the optimizer was "
                                  f"partitioned over {expected} ranks: a rank's file is missing")
        models = [_load(f) for f in _files(self.dir, "*_model_states.pt")]
        head = models[0]
        self._buffers = {k: v for k, v in head["module"].items() if k in head.get("buffer_names", [])}
        self._entries: dict[str, Any] = {}
        self._shapes: dict[str, torch.Size] = {}
        if self.stage <= 2:
            self._flat = [o["single_partition_of_fp32_groups"] for o in optim]
            self._index_zero12(head["param_shapes"], optim[0].get("param_alignment_paddings"))
        else:
            self._flat = [o["fp32_flat_groups"] for o in optim]
            self._index_zero3(head["param_shapes"])
        for name, shape in (head.get("frozen_param_shapes") or {}).items():
            frags = [m["frozen_param_fragments"][name] for m in models]
            self._entries[name] = ("frozen", frags)
            self._shapes[name] = torch.Size(shape)
        for name, buf in self._buffers.items():
            self._entries[name] = ("buffer", buf)
            self._shapes[name] = buf.shape
        for alias, source in (head.get("shared_params") or {}).items():
            if source in self._entries:
                self._entries[alias] = self._entries[source]
                self._shapes[alias] = self._shapes[source]
        self._names = {canonical_name(k): k for k in self._entries}

    def _index_zero12(self, param_shapes: list[dict[str, Any]], paddings: list[list[int]] | None) -> None:
        for g, shapes in enumerate(param_shapes):
            part = self._flat[0][g].numel()
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self._entries[name] = ("zero12", g, offset, part)
                self._shapes[name] = torch.Size(shape)
                offset += numel + (paddings[g][i] if paddings else 0)
            if offset > part * self.world:
                raise CheckpointError(f"{self.dir}: param group {g} needs {offset} elements but the "
                                      f"partitions hold {part * self.world}: corrupt checkpoint")

    def _index_zero3(self, param_shapes: list[dict[str, Any]]) -> None:
        from deepspeed.utils.zero_to_fp32 import GatheredTensor

        group_sizes = [t.numel() for t in self._flat[0]]
        group_offsets = [0]
        for n in group_sizes:
            group_offsets.append(group_offsets[-1] + n)
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                shape = torch.Size(shape)
                per_rank = math.ceil(shape.numel() / self.world)
                self._entries[name] = ("zero3", GatheredTensor(self._flat, group_offsets, offset, per_rank, shape))
                self._shapes[name] = shape
                offset += per_rank
        if offset != group_offsets[-1]:
            raise CheckpointError(f"{self.dir}: parameters use {offset} elements per rank but the "
                                  f"partitions hold {group_offsets[-1]}: corrupt checkpoint")

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> torch.Size:
        return self._shapes[self._names[name]]

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entries[self._names[name]]
        return entry[1].dtype if entry[0] == "buffer" else torch.float32

    def load(self, name: str) -> torch.Tensor:
        entry = self._entries[self._names[name]]
        shape = self.shape(name)
        kind = entry[0]
        if kind == "zero3":
            out = entry[1].contiguous()  # a fresh tensor (torch.cat of the rank slices), not a view of the file
        elif kind == "zero12":
            _, g, offset, part = entry
            out = torch.empty(shape.numel(), dtype=torch.float32)
            end, pos = offset + shape.numel(), 0
            for r in range(offset // part, self.world):
                lo, hi = max(offset, r * part), min(end, (r + 1) * part)
                if lo >= hi:
                    break
                out[pos:pos + hi - lo] = self._flat[r][g][lo - r * part:hi - r * part]
                pos += hi - lo
            out = out.view(shape)
        elif kind == "frozen":
            frags = entry[1]
            whole = frags[0] if frags[0].numel() >= shape.numel() else torch.cat([f.flatten() for f in frags])
            out = whole.flatten()[:shape.numel()].float().view(shape).clone()
        else:
            out = entry[1].clone()
        release_pages(t for flat in self._flat for t in flat)
        return out
