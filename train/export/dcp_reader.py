"""Read full tensors from a torch.distributed.checkpoint (DCP) directory without a process group.

DDP and FSDP2 checkpoints store the model as DCP (model/): FSDP's entries are sharded across
ranks' files, DDP's are whole. DCP reshards on load, so loading one key into a pre-allocated
full tensor with `no_dist=True` gathers it from every rank's file; only that tensor (plus the
chunk being copied) is in memory at a time. DCP itself loads with weights_only=True.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from train.export.weights import CheckpointError, canonical_name


class DCPWeights:
    """WeightSource over a DCP directory holding a model state dict."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            metadata = FileSystemReader(str(self.path)).read_metadata()
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.path} has no DCP .metadata file ({exc}): the checkpoint "
                                  "is incomplete or corrupt") from exc
        except Exception as exc:  # noqa: BLE001 - any bytes may be there: name the file, no traceback
            raise CheckpointError(f"{self.path / '.metadata'} is unreadable ({_last_line(exc)}): "
                                  "the checkpoint is corrupt") from exc
        self._keys: dict[str, str] = {}
        self._meta: dict[str, TensorStorageMetadata] = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                name = canonical_name(key)
                self._keys[name] = key
                self._meta[name] = md
        if not self._keys:
            raise CheckpointError(f"{self.path} holds no tensors: not a model checkpoint")

    def names(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._meta[name].size)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name].properties.dtype

    def load(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            try:
                dcp.load({self._keys[name]: out}, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a corrupt shard: name it
                raise CheckpointError(f"{self.path}: cannot read tensor {name} ({_last_line(exc)}): a shard "
                                      "file is truncated or corrupt; export another checkpoint") from None
        return out


def _last_line(exc: BaseException) -> str:
    """The reason, without the remote traceback DCP embeds in its exception text."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:240]
