"""Plots and a Markdown summary of a run from RUN_DIR/metrics.jsonl, without W&B.

    python -m train.report RUN_DIR [--out DIR]

writes loss.png, lr.png, throughput.png, data_wait.png, memory.png (those with data) and
summary.md into RUN_DIR/report/ (or --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from data_pipeline.fsutil import atomic_write, atomic_write_text
from train.checkpoint_layout import STEP_PREFIX

log = logging.getLogger("scaletrain.report")

Series = list[tuple[int, float]]


def load_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in step order; a later record of the same step and kind (a
    resumed run replaying steps) replaces the earlier one. The kind of a record that is neither a
    training step nor an evaluation is its set of keys, so a checkpoint's and an export's timing
    at one step both stay. Unreadable lines are skipped with a warning (a crash can leave a torn
    last line)."""
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s line %d skipped (%s): %.80s", path, n, e, line)
            continue
        kind = "train" if "loss" in rec else "eval" if "eval_loss" in rec else ",".join(sorted(rec))
        by_key[(step, kind)] = rec
    return [by_key[k] for k in sorted(by_key)]


def series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> Series:
    """(step, value) of every record with a finite number under `key`."""
    out = []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((int(rec["step"]), float(v) * scale))
    return out


def _memory_keys(records: list[dict[str, Any]]) -> list[str]:
    keys = {k for rec in records for k in rec
            if k.endswith("_gb") and ("mem" in k or "rss" in k) and "available" not in k and "total" not in k}
    return sorted(keys, key=lambda k: (k != "mem_peak_gb", k))


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def _figure(title: str, ylabel: str) -> tuple[plt.Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _plot(ax: plt.Axes, s: Series, label: str, smooth: bool = False, **kw: Any) -> None:
    xs, ys = [p[0] for p in s], [p[1] for p in s]
    if smooth and len(ys) > 50:
        ax.plot(xs, ys, alpha=0.3, label=f"{label} (raw)", **kw)
        ax.plot(xs, _smooth(ys), label=f"{label} (EMA 0.1)", **kw)
    else:
        ax.plot(xs, ys, marker="." if len(ys) < 50 else None, label=label, **kw)


def plot_all(records: list[dict[str, Any]], out: Path) -> list[str]:
    """Write every plot that has data; returns the file names written."""
    written = []
    loss, eval_loss = series(records, "loss"), series(records, "eval_loss")
    if loss or eval_loss:
        fig, ax = _figure("Loss", "loss")
        if loss:
            _plot(ax, loss, "train loss", smooth=True)
        if eval_loss:
            ax.plot([p[0] for p in eval_loss], [p[1] for p in eval_loss], "o-", color="tab:red", label="eval loss")
        for step in _nonfinite_steps(records):
            ax.axvline(step, color="red", alpha=0.3, lw=1)
        for n, (step, name) in enumerate(resumes(records)):
            ax.axvline(step, color="black", ls="--", lw=1,
                       label="interrupted; resumed from checkpoint" if n == 0 else None)
            ax.annotate(f"resumed from {name}", (step, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8)
        ax.legend()
        _save(fig, out / "loss.png")
        written.append("loss.png")
    simple = [("lr.png", "Learning rate", "lr", [("lr", 1.0, "lr")]),
              ("throughput.png", "Throughput", "tokens/s", [("tokens_per_s", 1.0, "tokens/s (global)")]),
              ("data_wait.png", "Share of step time waiting for data", "%",
               [("data_wait_frac", 100.0, "data wait %")])]
    for name, title, ylabel, keys in simple:
        data = [(series(records, k, scale), label) for k, scale, label in keys]
        if not any(s for s, _ in data):
            continue
        fig, ax = _figure(title, ylabel)
        for s, label in data:
            if s:
                _plot(ax, s, label)
        if name == "throughput.png" and series(records, "mfu"):
            ax2 = ax.twinx()
            mfu = series(records, "mfu", 100.0)
            ax2.plot([p[0] for p in mfu], [p[1] for p in mfu], color="tab:green", alpha=0.7, label="MFU %")
            ax2.set_ylabel("MFU %")
            ax2.set_ylim(bottom=0)
            ax2.legend(loc="lower right")
        ax.legend(loc="upper left")
        _save(fig, out / name)
        written.append(name)
    mem_keys = _memory_keys(records)
    if mem_keys:
        fig, ax = _figure("Memory", "GiB")
        for k in mem_keys:
            _plot(ax, series(records, k), k)
        ax.legend()
        _save(fig, out / "memory.png")
        written.append("memory.png")
    return written


def resumes(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, checkpoint name) where a new attempt began: the loop logs `resumed_from` on resume."""
    return [(int(r["step"]), str(r["resumed_from"])) for r in records if "resumed_from" in r]


def _nonfinite_steps(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["step"]) for r in records
            if "loss" in r and not (isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]))]


def summarize(records: list[dict[str, Any]], run_dir: Path, images: list[str]) -> str:
    """The Markdown summary: where the run got to and where its time went."""
    rows: list[tuple[str, str]] = []
    steps = [int(r["step"]) for r in records]
    loss, eval_loss = series(records, "loss"), series(records, "eval_loss")
    tps = series(records, "tokens_per_s")
    steady = tps[1:] if len(tps) > 1 else tps  # the first window includes start-up
    rows.append(("steps logged", f"{min(steps)} .. {max(steps)} ({len(records)} records)"))
    tokens = series(records, "tokens")
    if tokens:
        rows.append(("tokens seen (padding excluded)", f"{tokens[-1][1]:,.0f}"))
    trained = series(records, "trained_tokens")
    if trained:
        rows.append(("tokens trained on (labels != -100)", f"{trained[-1][1]:,.0f}"))
    if loss:
        best = min(loss, key=lambda p: p[1])
        rows += [("final loss", f"{loss[-1][1]:.4f} (step {loss[-1][0]})"),
                 ("lowest loss", f"{best[1]:.4f} (step {best[0]})")]
    if eval_loss:
        ppl = series(records, "eval_ppl")
        rows.append(("final eval loss", f"{eval_loss[-1][1]:.4f} (step {eval_loss[-1][0]})"
                     + (f", ppl {ppl[-1][1]:.2f}" if ppl else "")))
    if loss and eval_loss:  # the first train loss is the model's before any update when logged at step 1
        (s0, start), (s1, end) = loss[0], eval_loss[-1]
        rows.append(("start -> end", f"train loss {start:.4f} (step {s0}) -> eval loss {end:.4f} (step {s1}): "
                     f"{end - start:+.2f} nats"))
    for step, name in resumes(records):
        rows.append(("resumed", f"at step {step} from {name}"))
    nonfinite = _nonfinite_steps(records)
    if nonfinite:
        rows.append(("non-finite losses", f"{len(nonfinite)} (first at step {nonfinite[0]})"))
    if steady:
        rows.append(("tokens/s (median, first window excluded)", f"{statistics.median(v for _, v in steady):,.0f}"))
    for key, label, fmt in (("step_time_s", "step time (median)", "{:.3f} s"),
                            ("data_wait_frac", "data wait share (mean)", "{:.1%}"),
                            ("padding_frac", "padding share (mean)", "{:.1%}"),
                            ("mfu", "MFU (median)", "{:.1%}"),
                            ("checkpoint_time_s", "checkpoint time (mean)", "{:.2f} s"),
                            ("export_time_s", "export time (mean)", "{:.2f} s")):
        s = series(records, key)
        if s:
            value = statistics.median(v for _, v in s) if "median" in label else statistics.fmean(v for _, v in s)
            rows.append((label, fmt.format(value)))
    wait = series(records, "data_wait_frac")
    if wait:
        rows.append(("data wait share (max)", f"{max(v for _, v in wait):.1%}"))
    for k in _memory_keys(records):
        rows.append((f"{k} (max)", f"{max(v for _, v in series(records, k)):.2f} GiB"))
    lines = [f"# Run report: {run_dir.name}", "",
             f"Run directory `{run_dir}`; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} "
             "from metrics.jsonl by `python -m train.report`.", "",
             "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += export_quality_lines(run_dir)
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def export_quality_lines(run_dir: Path) -> list[str]:
    """The newest export's quality.json as a table (what each served format loses), if any."""
    import json

    from train.export.quality import QUALITY_NAME, table

    found = sorted((run_dir / "exports").glob(f"{STEP_PREFIX}*/{QUALITY_NAME}"))
    if not found:
        return []
    try:
        return [f"## Export quality ({found[-1].parent.name})", "", table(json.loads(found[-1].read_text())), ""]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"## Export quality: {found[-1]} is unreadable ({type(exc).__name__}: {exc})", ""]


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the plots and summary.md; returns the report directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory (run.dir) that "
                                "`python -m train` has logged into")
    records = load_records(path)
    if not records:
        raise ValueError(f"{path} has no readable records yet: let the run log a step "
                         "(trainer.log_every) and try again")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plot_all(records, out)
    atomic_write_text(out / "summary.md", summarize(records, run_dir, images))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (run.dir) holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
