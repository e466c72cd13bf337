"""Per-document arrays that a rank's DataLoader workers map instead of receiving a copy.

Workers start from a forkserver (stream.py), so each one receives its RankStream by pickle. The
shard table's per-document arrays (offsets, lengths, cumulative tokens, chat mask offsets: 24-32
bytes a document) and a chat order's cached epoch rows would be copied into every worker: about
240 MB per worker for 10 million documents, which a fork used to share copy-on-write. Instead the
holders of those arrays (`ShardTable`, `rows.RowOrder`) pickle them as shared-memory CPU tensors:
the rank moves each array into shared memory once (and keeps only that copy, as a numpy view), and
torch's reductions for multiprocessing (registered by `import torch.multiprocessing`, which
DataLoader does) send a worker a file descriptor of that memory, which it maps and views as numpy
again. A worker's start then costs O(shards) pickled bytes and no private memory per document.

The same state pickles by value with a plain pickler (torch's own tensor pickling), and
`copy.deepcopy` copies the tensors, so in-process copies keep working.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch


def shared(arr: np.ndarray) -> np.ndarray:
    """arr when it already is a whole shared-memory tensor's numpy view, else such a view of a copy
    of it (the one copy a rank makes; `tensor_of` gives the tensor back)."""
    base = arr.base
    if isinstance(base, torch.Tensor) and base.is_shared() and base.numel() == arr.size \
            and base.data_ptr() == arr.ctypes.data and arr.flags.c_contiguous:
        return arr
    return torch.from_numpy(np.ascontiguousarray(arr)).share_memory_().numpy()


def tensor_of(view: np.ndarray) -> torch.Tensor:
    """The shared tensor behind a view `shared` returned (numpy keeps it as the view's base)."""
    assert isinstance(view.base, torch.Tensor), "not a view made by shared()"
    return view.base


def share_fields(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """obj's state for pickling with each named array (None allowed) as a shared tensor; obj is
    rebound to views of the same memory, so the rank holds one copy and shares it on every pickle."""
    state = dict(obj.__dict__)
    for name in names:
        arr = state[name]
        if arr is not None:
            view = shared(arr)
            setattr(obj, name, view)
            state[name] = tensor_of(view)
    return state


def numpy_fields(state: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """A state `share_fields` made, with numpy views (no copy) in place of its tensors."""
    for name in names:
        if isinstance(state[name], torch.Tensor):
            state[name] = state[name].numpy()
    return state
