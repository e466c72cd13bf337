"""Run a command and print the peak resident set of its largest descendant (a torchrun rank).

`getrusage(RUSAGE_CHILDREN)` covers every waited-for descendant (torchrun waits for its ranks), and
its ru_maxrss is the largest one's peak: the per-rank peak over the whole run. Usage:
    python -m tests.support.peak_rss CMD ARGS...   (prints `peak_rss_bytes N` last)
"""
from __future__ import annotations

import resource
import subprocess
import sys

if __name__ == "__main__":
    rc = subprocess.run(sys.argv[1:]).returncode
    print(f"peak_rss_bytes {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}", flush=True)
    sys.exit(rc)
