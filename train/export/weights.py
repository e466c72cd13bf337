"""What every checkpoint weight reader shares: its protocol, its error, and name cleanup.

A leaf module: the readers (dcp_reader, zero_reader) and checkpoint_reader, which picks one,
all import it, and it imports none of them.
"""
from __future__ import annotations

import ctypes
import mmap
from typing import Iterable, Protocol

import torch

# Segments that wrappers insert into parameter names; the export uses plain Hugging Face names.
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file and the fix."""


class WeightSource(Protocol):
    """Full (unsharded) tensors of a checkpoint, materialised one at a time."""

    def names(self) -> list[str]:
        """Hugging Face parameter/buffer names, in checkpoint order."""

    def shape(self, name: str) -> torch.Size: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def load(self, name: str) -> torch.Tensor:
        """The full tensor `name` (fp32 for floating weights); the caller owns it."""


def canonical_name(key: str) -> str:
    """`module.model.layers.0...` (DDP), `_orig_mod.` (compile) ... -> the Hugging Face name."""
    for seg in _WRAPPER_SEGMENTS:
        if key.startswith(seg):
            key = key[len(seg):]
        key = key.replace("." + seg, ".")
    return key


_libc = None


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of memory-mapped (read-only) tensors.

    Reading a tensor slice from a torch.load(mmap=True) file maps its pages into this process;
    without this they would pile up until the whole file is resident, which is exactly what a
    low-memory export must avoid. MADV_DONTNEED on a clean file mapping only unmaps: the next
    read faults the data back in from the file (or the page cache).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for t in tensors:
        nbytes = t.untyped_storage().nbytes()
        if nbytes < page:
            continue
        start = t.untyped_storage().data_ptr()
        aligned = (start + page - 1) // page * page
        length = (start + nbytes - aligned) // page * page
        if length > 0:
            _libc.madvise(aligned, length, 4)  # MADV_DONTNEED
