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

import warnings
import weakref
from typing import Any, Iterable

import numpy as np
import torch

SHARED_BUDGET = 192
"""At most this many arrays live in shared memory per process. Each one is a file descriptor sent
at every worker start, and Python's forkserver refuses a start with more than 251: a mixture of a
few dozen chat sources (about 10 arrays each) would reach that; the worker's queues and its rank's
sentinel take a few more. Arrays past the budget go to the workers as copies, as before sharing
(one warning)."""
_live: set[int] = set()


def shared(arr: np.ndarray) -> np.ndarray:
    """arr when it already is a whole shared-memory tensor's numpy view, else such a view of a copy
    of it (the one copy a rank makes; `for_pickle` gives the tensor back). When shared memory
    (/dev/shm) has no room, or SHARED_BUDGET arrays are shared already, arr itself, with a warning:
    workers then get a copy each, as before."""
    if _whole_shared(arr):
        return arr
    if len(_live) >= SHARED_BUDGET:
        _warn_once(f"more than {SHARED_BUDGET} arrays of shard indexes (a mixture of many sources), so "
                   "DataLoader workers get a copy of the others (Python's forkserver passes at most 251 file "
                   "descriptors to a worker)")
        return arr
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).share_memory_()
    except RuntimeError as exc:   # torch reserves the pages up front: ENOSPC here, not a SIGBUS later
        warnings.warn(f"no room in shared memory for {arr.nbytes:,} bytes of the shard index, so each "
                      f"DataLoader worker gets a copy ({exc}); give the machine or container a larger "
                      "/dev/shm (docker run --shm-size)", RuntimeWarning, stacklevel=3)
        return arr
    view = tensor.numpy()
    _live.add(id(view.base))
    weakref.finalize(view.base, _live.discard, id(view.base))   # the tensor the view keeps alive
    return view


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _whole_shared(arr: np.ndarray) -> bool:
    base = arr.base
    return isinstance(base, torch.Tensor) and base.is_shared() and base.numel() == arr.size \
        and base.data_ptr() == arr.ctypes.data and arr.flags.c_contiguous


def for_pickle(view: np.ndarray) -> torch.Tensor | np.ndarray:
    """What pickles in place of a view `shared` returned: its shared tensor (numpy keeps it as the
    view's base), or the array itself when it could not be shared."""
    return view.base if _whole_shared(view) else view


def share_fields(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """obj's state for pickling with each named array (None allowed) as a shared tensor; obj is
    rebound to views of the same memory, so the rank holds one copy and shares it on every pickle."""
    state = dict(obj.__dict__)
    for name in names:
        arr = state[name]
        if arr is not None:
            view = shared(arr)
            setattr(obj, name, view)
            state[name] = for_pickle(view)
    return state


def numpy_fields(state: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """A state `share_fields` made, with numpy views (no copy) in place of its shared tensors."""
    for name in names:
        state[name] = numpy_of(state[name])
    return state


def numpy_of(value: Any) -> Any:
    """A tensor's numpy view (no copy); anything else as it is."""
    return value.numpy() if isinstance(value, torch.Tensor) else value
