"""Peak host memory of `python -m data_pipeline.prepare` on one huge document.

    python bench/prepare_memory.py [--mb 10] [--keep DIR]

The same text (standard-library sources, repeated to --mb megabytes) is prepared twice with one
tokenizer process and a fixed tokenizer: once as one document, once cut into documents of 200 kB
(the baseline in the same run: ordinary documents, the size prepare handles in one call). Peak RSS
is the child's ru_maxrss (resource.getrusage of children, read by a fresh wrapper process per run).
Ends with one JSON line, the ratio first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))
WRAPPER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t0, rc)
"""


def peak(src: Path, out: Path, tokenizer: Path) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one prepare run in a fresh process."""
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"source.path={src}", f"out={out}",
           f"tokenizer.path={tokenizer}", "num_proc=1", "progress=false", "split.val_fraction=0"]
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=REPO, env=ENV, capture_output=True,
                         text=True, check=True)
    kb, secs, rc = res.stdout.split()
    if rc != "0":
        sys.exit(f"prepare failed on {src}: {res.stderr[-3000:]}")
    return int(kb) / 2**20, float(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="prepare-memory-"))
    tok_out = root / "tok"
    subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "source.path=stdlib", "source.max_files=24",
                    "tokenizer.vocab_size=400", f"out={tok_out}", "num_proc=1", "progress=false"],
                   cwd=REPO, env=ENV, check=True, capture_output=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    text = "".join(p.read_text(errors="replace") for p in files)
    chars = int(args.mb * 1e6)
    text = (text * (chars // len(text) + 1))[:chars]
    (root / "one").mkdir(exist_ok=True)
    (root / "one" / "huge.txt").write_text(text)
    (root / "many").mkdir(exist_ok=True)
    step = 200_000
    for i in range(0, len(text), step):
        (root / "many" / f"doc{i // step:05d}.txt").write_text(text[i:i + step])
    huge_gb, huge_s = peak(root / "one", root / "out-one", tok_out / "tokenizer")
    base_gb, base_s = peak(root / "many", root / "out-many", tok_out / "tokenizer")
    print(json.dumps({"peak_ratio_one_doc_vs_200kB_docs": round(huge_gb / base_gb, 2),
                      "time_ratio": round(huge_s / base_s, 2), "one_doc_peak_gib": round(huge_gb, 3),
                      "docs_200kB_peak_gib": round(base_gb, 3), "mb": args.mb}))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
