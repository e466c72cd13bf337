"""Host allocator settings that keep a rank's resident set near what it holds.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after the first all-gathered layer is released, later blocks of a few MiB to 32 MiB come from
the heap, where freed space is kept rather than returned: measured on a 150M LoRA run under FSDP
on 2 CPU ranks, each rank's resident set grew ~30 MiB per decoder layer through step 1 (+2.6x
the bf16 files over the tiny baseline instead of +1.5x). A fixed threshold stops that: blocks
from `MMAP_THRESHOLD` up are mapped and unmapped, so a layer's gathered weights are given back
when freed. Only where the C library is glibc, and not when the user set MALLOC_MMAP_THRESHOLD_.

The threshold is 64 KiB, not 1 MiB: activations and their temporaries of 64 KiB to 1 MiB (a
[tokens, hidden] or [tokens, intermediate] fp32 tensor at short sequences) came from the heap
too, where freed ones between live ones kept ~30 MiB resident at the peak of the same run (0.1x
the bf16 files; issue 17). A mapping costs a system call and the page faults of first touch,
small beside the arithmetic on a block that size.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 64 << 10  # 64 KiB: weights and activations are mapped, small tensors stay on the heap


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold for this process; True when it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
