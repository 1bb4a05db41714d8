"""The runs table: benchmark accuracies of several runs side by side (METHOD.md section 9).

``update_results(results_dir, run, benchmark, summary)`` records one benchmark result of one
run in ``results.json`` (the source of truth; a rerun of the same run and benchmark replaces
its entry) and rewrites from it:

* ``results.md``: accuracy (%) with rows = runs and columns = the seven paper benchmarks
  (MVista, MVerse, MVision, WeMath, MMMU, MMMU-Pro, Hallu) + Avg, then the same layout for
  mean response tokens (the paper reports those too) and the judge counts;
* ``results.csv``: the accuracy table (empty cells for benchmarks a run lacks);
* ``results.png``: a grouped bar chart of the accuracy table (matplotlib, Agg canvas).

Avg is the mean over the benchmarks a run has; in Markdown it carries a ``*`` when the run
lacks some of the seven. Benchmarks outside the seven get columns after them.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .benchmark_table import BENCHMARKS

__all__ = ["columns", "load_results", "plot_results", "results_csv_rows", "results_markdown",
           "update_results", "write_report"]

RESULTS_JSON = "results.json"
PAPER_ORDER = ("mathvista", "mathverse", "mathvision", "wemath", "mmmu", "mmmu_pro",
               "hallusionbench")


def _label(bench: str) -> str:
    spec = BENCHMARKS.get(bench)
    return spec.label if spec else bench


def load_results(results_dir: str | Path) -> dict:
    """``{"runs": {run: {benchmark: entry}}}`` from ``results.json`` (empty if absent)."""
    p = Path(results_dir) / RESULTS_JSON
    if not p.exists():
        return {"runs": {}}
    data = json.loads(p.read_text())
    data.setdefault("runs", {})
    return data


def _entry(summary: dict) -> dict:
    keys = ("accuracy", "rule_accuracy", "format_rate", "mean_response_tokens", "n_records",
            "judged", "judge_flipped", "judge_failed", "model", "data", "judge_model")
    entry = {k: summary.get(k) for k in keys}
    entry["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return entry


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def update_results(results_dir: str | Path, run: str, benchmark: str, summary: dict) -> dict[str, Path]:
    """Add (or replace) ``run``'s result on ``benchmark`` and rewrite every report file."""
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    results = load_results(d)
    results["runs"].setdefault(run, {})[benchmark] = _entry(summary)
    _atomic_write(d / RESULTS_JSON, json.dumps(results, indent=2))
    return {"json": d / RESULTS_JSON, **write_report(d, results)}


def columns(results: dict) -> list[str]:
    """Benchmark keys to show: the paper's seven, then any other in first-seen order."""
    extra = []
    for per_run in results["runs"].values():
        extra += [b for b in per_run if b not in PAPER_ORDER and b not in extra]
    return list(PAPER_ORDER) + extra


def _average(per_run: dict, cols: list[str], key: str) -> tuple[float | None, bool]:
    """Mean of ``key`` over the benchmarks present, and whether all seven were present."""
    vals = [per_run[b][key] for b in cols if b in per_run and per_run[b].get(key) is not None]
    complete = all(b in per_run for b in PAPER_ORDER)
    return (sum(vals) / len(vals) if vals else None), complete


def _table(results: dict, key: str, scale: float, fmt: str, mark_partial: bool) -> list[str]:
    cols = columns(results)
    head = ["run"] + [_label(b) for b in cols] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, per_run in results["runs"].items():
        cells = [run]
        for b in cols:
            v = per_run.get(b, {}).get(key)
            cells.append("-" if v is None else format(scale * v, fmt))
        avg, complete = _average(per_run, cols, key)
        star = "*" if mark_partial and not complete else ""
        cells.append("-" if avg is None else format(scale * avg, fmt) + star)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _judge_lines(results: dict) -> list[str]:
    lines = ["| run | benchmark | records | rules acc | judged | flipped | not judged |",
             "|---|---|---|---|---|---|---|"]
    for run, per_run in results["runs"].items():
        for b, e in per_run.items():
            ra = e.get("rule_accuracy")
            lines.append(f"| {run} | {_label(b)} | {e.get('n_records', '-')} | "
                         f"{'-' if ra is None else f'{100 * ra:.1f}'} | {e.get('judged', 0)} | "
                         f"{e.get('judge_flipped', 0)} | {e.get('judge_failed', 0)} |")
    return lines


def results_markdown(results: dict) -> str:
    """The Markdown report: accuracy, mean response tokens, judge counts."""
    parts = ["# Evaluation results", "", "Accuracy (%)", ""]
    parts += _table(results, "accuracy", 100.0, ".1f", mark_partial=True)
    if any(not all(b in r for b in PAPER_ORDER) for r in results["runs"].values()):
        parts += ["", "\\* average over the benchmarks the run has (not all seven)."]
    parts += ["", "Mean response tokens", ""]
    parts += _table(results, "mean_response_tokens", 1.0, ".0f", mark_partial=False)
    parts += ["", "Judge (consulted only where the rules say wrong)", ""]
    parts += _judge_lines(results)
    return "\n".join(parts) + "\n"


def results_csv_rows(results: dict) -> list[list[str]]:
    """Header + one row per run: accuracy (%) per benchmark column and Avg."""
    cols = columns(results)
    rows = [["run"] + [_label(b) for b in cols] + ["Avg"]]
    for run, per_run in results["runs"].items():
        row = [run]
        for b in cols:
            v = per_run.get(b, {}).get("accuracy")
            row.append("" if v is None else f"{100 * v:.2f}")
        avg, _ = _average(per_run, cols, "accuracy")
        row.append("" if avg is None else f"{100 * avg:.2f}")
        rows.append(row)
    return rows


def plot_results(results: dict, path: str | Path) -> Path:
    """Grouped bars: one group per benchmark present in some run (+ Avg), one bar per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [b for b in columns(results) if any(b in r for r in results["runs"].values())]
    labels = [_label(b) for b in cols] + ["Avg"]
    runs = list(results["runs"].items())
    fig = Figure(figsize=(max(6.0, 1.2 * len(labels) + 0.4 * len(runs)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / max(len(runs), 1)
    for i, (run, per_run) in enumerate(runs):
        vals = [100 * per_run[b]["accuracy"] if b in per_run else 0.0 for b in cols]
        avg, _ = _average(per_run, cols, "accuracy")
        vals.append(100 * avg if avg is not None else 0.0)
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width=width, label=run)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("Benchmark accuracy by run")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out


def write_report(results_dir: str | Path, results: dict | None = None) -> dict[str, Path]:
    """Rewrite ``results.md``, ``results.csv`` and ``results.png`` from ``results``."""
    d = Path(results_dir)
    results = results if results is not None else load_results(d)
    md, csv_path, png = d / "results.md", d / "results.csv", d / "results.png"
    _atomic_write(md, results_markdown(results))
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(results_csv_rows(results))
    os.replace(tmp, csv_path)
    plot_results(results, png)
    return {"md": md, "csv": csv_path, "png": png}
