"""The comparison table: every evaluation run under a results root, side by side (METHOD.md section 9).

:func:`write_report` reads every ``<root>/<run>/<part>/summary.json`` (the layout of
``prism_rl.eval.layout``) and writes, in ``<root>``:

* ``results.md``: each benchmark's headline number (%) with rows = runs and columns = the
  seven paper benchmarks (MVista, MVerse, MVision, WeMath, MMMU, MMMU-Pro, Hallu) + Avg, then
  one column per held-out file, followed by what each column's number is (WeMath: the strict
  score; MMMU-Pro: the mean of its two settings, ``-`` when one is missing; Hallu: aAcc ...,
  ``benchmark_table.BenchmarkSpec.headline``), the numbers beside each headline and the notes;
  then the same layout for mean response tokens (the paper reports those too), the judge
  counts, and which model each run evaluated;
* ``results.csv``: the accuracy table (empty cells for what a run lacks);
* ``results.png``: a grouped bar chart of the accuracy table (matplotlib, Agg canvas);
* ``results.json``: the collected entries (written for tools; the summaries are the source).

The summaries are the only source, so the table always shows what the run folders hold: a
deleted run disappears, a rerun replaces its own entry. Avg is the mean over the benchmarks a
run has (held-out files are not averaged in); in Markdown it carries a ``*`` when the run lacks
some of the seven. The paper's columns appear once any run has a benchmark result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from .benchmark_metrics import details_text
from .benchmark_table import BENCHMARKS
from .layout import RUN_FILE, atomic_write

__all__ = ["collect_results", "columns", "plot_results", "results_csv_rows", "results_markdown",
           "summary_line", "write_report"]

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
HELDOUT_PREFIX = "heldout-"
PAPER_ORDER = ("mathvista", "mathverse", "mathvision", "wemath", "mmmu", "mmmu_pro",
               "hallusionbench")


def _label(part: str) -> str:
    if part.startswith(HELDOUT_PREFIX):
        return "held-out " + part[len(HELDOUT_PREFIX):]
    spec = BENCHMARKS.get(part)
    return spec.label if spec else part


def _entry(part: str, summary: dict) -> dict:
    """The table's view of one summary (a held-out summary keeps its numbers in ``overall``)."""
    if part.startswith(HELDOUT_PREFIX):
        o = summary.get("overall", {})
        return {"accuracy": o.get("accuracy"), "format_rate": o.get("format_rate"),
                "mean_response_tokens": o.get("mean_response_tokens"), "n_records": o.get("n_prompts"),
                "model": summary.get("model"), "data": summary.get("data")}
    keys = ("accuracy", "rule_accuracy", "record_accuracy", "format_rate", "mean_response_tokens", "n_records",
            "judged", "judge_flipped", "judge_failed", "model", "data", "judge_model", "notes")
    return {**{k: summary.get(k) for k in keys}, "details": details_text(summary)}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: left out of the comparison table (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def collect_results(root: str | Path) -> dict:
    """``{"runs": {run: {part: entry}}, "models": {run: model path}}`` from every summary under
    ``root`` (runs in name order)."""
    runs: dict[str, dict] = {}
    models: dict[str, str] = {}
    for summary_path in sorted(Path(root).glob("*/*/summary.json")):
        part, run = summary_path.parent.name, summary_path.parent.parent.name
        summary = _read_json(summary_path)
        if summary is None:
            continue
        runs.setdefault(run, {})[part] = _entry(part, summary)
        run_file = summary_path.parent.parent / RUN_FILE
        owner = _read_json(run_file) if run_file.exists() else None
        models[run] = str((owner or {}).get("model") or summary.get("model") or "?")
    return {"runs": runs, "models": models}


def _is_benchmark(part: str) -> bool:
    return not part.startswith(HELDOUT_PREFIX)


def columns(results: dict) -> list[str]:
    """Parts to show: the paper's seven (once any run has a benchmark), other benchmarks in
    first-seen order, then the held-out files by name."""
    seen = [p for per_run in results["runs"].values() for p in per_run]
    bench = [p for p in dict.fromkeys(seen) if _is_benchmark(p)]
    extra = [p for p in bench if p not in PAPER_ORDER]
    paper = list(PAPER_ORDER) if bench else []
    return paper + extra + sorted({p for p in seen if not _is_benchmark(p)})


def _average(per_run: dict, cols: list[str], key: str) -> tuple[float | None, bool]:
    """Mean of ``key`` over the benchmarks present, and whether all seven were present."""
    vals = [per_run[b][key] for b in cols if _is_benchmark(b) and b in per_run and per_run[b].get(key) is not None]
    complete = all(b in per_run for b in PAPER_ORDER)
    return (sum(vals) / len(vals) if vals else None), complete


def _fmt(v: float | None, scale: float, fmt: str, empty: str) -> str:
    return empty if v is None else format(scale * v, fmt)


def _rows(results: dict, key: str, scale: float, fmt: str, empty: str, star: bool) -> list[list[str]]:
    """Header + one row per run: ``key`` per column, then Avg when there are benchmarks."""
    cols = columns(results)
    with_avg = any(_is_benchmark(c) for c in cols)
    rows = [["run"] + [_label(c) for c in cols] + (["Avg"] if with_avg else [])]
    for run, per_run in results["runs"].items():
        row = [run] + [_fmt(per_run.get(c, {}).get(key), scale, fmt, empty) for c in cols]
        if with_avg:
            avg, complete = _average(per_run, cols, key)
            row.append(_fmt(avg, scale, fmt, empty) + ("*" if star and avg is not None and not complete else ""))
        rows.append(row)
    return rows


def _markdown(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _judge_lines(results: dict) -> list[str]:
    lines = ["| run | benchmark | records | score by the rules alone | judged | flipped | not judged |",
             "|---|---|---|---|---|---|---|"]
    for run, per_run in results["runs"].items():
        for b, e in per_run.items():
            if not _is_benchmark(b):
                continue
            ra = e.get("rule_accuracy")
            lines.append(f"| {run} | {_label(b)} | {e.get('n_records', '-')} | "
                         f"{'-' if ra is None else f'{100 * ra:.1f}'} | {e.get('judged', 0)} | "
                         f"{e.get('judge_flipped', 0)} | {e.get('judge_failed', 0)} |")
    return lines


def _legend(results: dict) -> list[str]:
    """What each benchmark column's number is, then each run's numbers beside it and notes."""
    cols = [c for c in columns(results) if c in BENCHMARKS]
    lines = ["", "What each number is:", ""]
    lines += [f"- {BENCHMARKS[c].label}: {BENCHMARKS[c].headline}" for c in cols]
    lines += [f"- {_label(c)}: accuracy" for c in columns(results) if not _is_benchmark(c)]
    beside = [f"- {run}, {_label(b)}: {e['details']}" for run, per_run in results["runs"].items()
              for b, e in per_run.items() if e.get("details")]
    notes = [f"- {run}: {n}" for run, per_run in results["runs"].items() for e in per_run.values()
             for n in e.get("notes") or []]
    if beside:
        lines += ["", "Beside the headline:", "", *beside]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return lines


def results_markdown(results: dict) -> str:
    """The Markdown report: headline numbers and what they are, mean response tokens, judge
    counts, models."""
    parts = ["# Evaluation results", "", "Score (%): each benchmark's own headline metric", ""]
    parts += _markdown(_rows(results, "accuracy", 100.0, ".1f", "-", star=True))
    if any(_is_benchmark(c) for c in columns(results)) and any(
            not all(b in r for b in PAPER_ORDER) for r in results["runs"].values()):
        parts += ["", "\\* average over the benchmarks the run has (not all seven)."]
    if columns(results):
        parts += _legend(results)
    parts += ["", "Mean response tokens", ""]
    parts += _markdown(_rows(results, "mean_response_tokens", 1.0, ".0f", "-", star=False))
    if any(_is_benchmark(p) for r in results["runs"].values() for p in r):
        parts += ["", "Judge (consulted only where the rules say wrong)", ""]
        parts += _judge_lines(results)
    parts += ["", "Models", "", "| run | model |", "|---|---|"]
    parts += [f"| {run} | {results.get('models', {}).get(run, '?')} |" for run in results["runs"]]
    return "\n".join(parts) + "\n"


def summary_line(s: dict) -> str:
    """The console line of one benchmark run: its headline number (named), the rules' figure
    for the same number, the numbers beside it, format rate, tokens, records and judge counts."""
    head = s.get("headline", "accuracy")
    if s.get("accuracy") is None:
        score = f"no {head} ({'; '.join(s.get('notes') or []) or 'not computable from these records'})"
    else:
        score = f"{head}: {100 * s['accuracy']:.1f}% (rules {100 * s['rule_accuracy']:.1f}%)"
    details = details_text(s)
    sep = ": " if s.get("accuracy") is None else " "
    return (f"{s['label']}{sep}{score}" + (f"; {details}" if details else "")
            + f"; format {100 * s['format_rate']:.1f}%, {s['mean_response_tokens']:.0f} response tokens, "
            f"{s['n_records']} records ({s['generated_now']} generated now), judged {s['judged']} "
            f"(flipped {s['judge_flipped']}, failed {s['judge_failed']})")


def results_csv_rows(results: dict) -> list[list[str]]:
    """Header + one row per run: accuracy (%) per column and Avg."""
    return _rows(results, "accuracy", 100.0, ".2f", "", star=False)


def plot_results(results: dict, path: str | Path) -> Path:
    """Grouped bars: one group per column some run has (+ Avg), one bar per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [c for c in columns(results) if any(c in r for r in results["runs"].values())]
    with_avg = any(_is_benchmark(c) for c in cols)
    labels = [_label(c) for c in cols] + (["Avg"] if with_avg else [])
    runs = list(results["runs"].items())
    fig = Figure(figsize=(max(6.0, 1.2 * len(labels) + 0.4 * len(runs)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / max(len(runs), 1)
    for i, (run, per_run) in enumerate(runs):
        vals = [100 * (per_run.get(c, {}).get("accuracy") or 0.0) for c in cols]
        if with_avg:
            avg, _ = _average(per_run, cols, "accuracy")
            vals.append(100 * avg if avg is not None else 0.0)
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width=width, label=run)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize="small")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    if runs:
        ax.legend(fontsize="small")
    ax.set_title("Accuracy by run")
    fig.tight_layout()
    out = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(out, buf.getvalue())
    return out


def write_report(root: str | Path) -> dict[str, Path]:
    """Rebuild ``results.md``, ``.csv``, ``.png`` and ``.json`` in ``root`` from every run's
    summaries; returns their paths."""
    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    results = collect_results(d)
    paths = {"md": d / "results.md", "csv": d / "results.csv", "png": d / "results.png", "json": d / RESULTS_JSON}
    atomic_write(paths["json"], json.dumps(results, indent=2))
    atomic_write(paths["md"], results_markdown(results))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(results_csv_rows(results))
    atomic_write(paths["csv"], buf.getvalue())
    plot_results(results, paths["png"])
    return paths
