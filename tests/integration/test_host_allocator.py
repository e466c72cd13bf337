"""train/host_memory.py `tune_allocator` against glibc itself: what a step's freed heap costs the next step.

Each case is a fresh process (the allocator's settings are process-wide) that mallocs 4 MiB in
256 KiB blocks (below the fixed 1 MiB mmap threshold: heap blocks, like a narrow model's
activations), touches and frees them, ten times, and counts the page faults of the last nine
rounds. If the top of the heap is trimmed after each round, every round faults its 1024 pages in
again (what the trainer did per step before issue 16's fix).
"""
from __future__ import annotations

import platform
import subprocess

import pytest

from tests.helpers import PY, REPO, child_env

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

ROUNDS = """
import ctypes, resource, sys
from train.host_memory import tune_allocator
print("tuned", tune_allocator(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
BLOCK, N = 256 << 10, 16

def one_round():
    ptrs = [libc.malloc(BLOCK) for _ in range(N)]
    for p in ptrs:
        libc.memset(p, 1, BLOCK)
    for p in reversed(ptrs):
        libc.free(p)

one_round()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
PAGES_PER_ROUND = (16 * 256 << 10) // 4096


def faults(**env: str) -> int:
    proc = subprocess.run([PY, "-c", ROUNDS], cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=60, check=True)
    return int(proc.stdout.split()[-1])


def test_tuned_heap_is_kept_between_rounds():
    assert faults() < PAGES_PER_ROUND  # nine rounds, fewer faults than one round's pages


def test_trim_threshold_left_at_the_default_refaults_every_round():
    """The twin: the same rounds with the trim threshold at glibc's 128 KiB default (set in the
    environment, which tune_allocator leaves alone) fault each round's pages in again."""
    assert faults(MALLOC_TRIM_THRESHOLD_=str(128 << 10)) > 8 * PAGES_PER_ROUND
