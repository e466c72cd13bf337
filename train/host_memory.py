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

Fixing the mmap threshold also fixes glibc's trim threshold (the free space at the top of the heap
that `free` gives back with `brk`), which glibc otherwise raises with the mmap threshold (to twice
it): left at its 128 KiB default, a narrow model's step frees its activations, the top of the heap is
returned, and the next step faults the same pages in again (hidden 128, 256 tokens: ~400 page faults
and ~1 ms of system time a step, the trainer's main cost over a hand-written loop on glibc's
defaults; issue 16). The trim threshold is therefore fixed with it, at `TRIM_THRESHOLD` (8 MiB: 2 MiB
still refaulted ~150 pages a step there, 4 MiB ~40, 8 MiB none). What it keeps is free heap below
8 MiB per process; larger blocks are mapped and unmapped as before. `MALLOC_TRIM_THRESHOLD_` in the
environment overrides it.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # 1 MiB: a layer's weights are mapped, small activations stay on the heap
WIDE_MMAP_THRESHOLD = 64 << 10  # 64 KiB: a wide model's activations are mapped too
WIDE_HIDDEN = 768
TRIM_THRESHOLD = 8 << 20  # 8 MiB: a narrow model's per-step heap stays mapped between steps


def tune_allocator(hidden_size: int | None = None) -> bool:
    """Fix glibc's mmap threshold for this process (the narrow one before the model is known, the
    wide one when `hidden_size` says so) and its trim threshold with it; True when the mmap
    threshold was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    wide = hidden_size is not None and hidden_size >= WIDE_HIDDEN
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)  # glibc's dynamic rule no longer raises it (docstring)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, WIDE_MMAP_THRESHOLD if wide else MMAP_THRESHOLD))
