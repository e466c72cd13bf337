"""Host allocator settings that keep a rank's resident set near what it holds.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after the first all-gathered layer is released, later blocks of a few MiB to 32 MiB come from
the heap, where freed space is kept rather than returned: measured on a 150M LoRA run under FSDP
on 2 CPU ranks, each rank's resident set grew ~30 MiB per decoder layer through step 1 (+2.6x
the bf16 files over the tiny baseline instead of +1.5x). A fixed threshold stops that: blocks
from `MMAP_THRESHOLD` up are mapped and unmapped, so a layer's gathered weights are given back
when freed. Only where the C library is glibc, and not when the user set MALLOC_MMAP_THRESHOLD_.

Once the model is known to be wide (hidden size >= WIDE_HIDDEN) the threshold drops to 64 KiB:
activations and their temporaries of 64 KiB to 1 MiB (a [tokens, hidden] or [tokens,
intermediate] fp32 tensor at short sequences) came from the heap too, where freed ones between
live ones kept ~30 MiB resident at the peak of the 150M run (0.1x the bf16 files; issue 17). A
mapping costs a system call and the page faults of first touch: nothing measurable beside a wide
model's arithmetic (hidden 768 and 1024: the same step time within noise), but a narrow model's
steps are mostly allocation (hidden 128, 256 tokens: 24 ms a step instead of 13.5 ms), and its heap
waste is a few MiB, so narrow models keep 1 MiB.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20  # 1 MiB: a layer's weights are mapped, small activations stay on the heap
WIDE_MMAP_THRESHOLD = 64 << 10  # 64 KiB: a wide model's activations are mapped too
WIDE_HIDDEN = 768


def tune_allocator(hidden_size: int | None = None) -> bool:
    """Fix glibc's mmap threshold for this process (the narrow one before the model is known, the
    wide one when `hidden_size` says so); True when it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    wide = hidden_size is not None and hidden_size >= WIDE_HIDDEN
    return bool(libc.mallopt(M_MMAP_THRESHOLD, WIDE_MMAP_THRESHOLD if wide else MMAP_THRESHOLD))
