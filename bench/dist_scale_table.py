"""The table of ``bench/dist_scale.sh``: step time, throughput and peak memory per card of each run.

    python bench/dist_scale_table.py OUT

Reads ``OUT/<run>.metrics.jsonl`` (the run's own metrics; rank 0 logs) and ``OUT/smi_<run>.csv``
(nvidia-smi's used memory per GPU, sampled every 0.5 s). The step time is the median over the
steps after the first (the first holds CUDA-graph capture and allocator warm-up) when a run has
more than one, else the single step's. Speed-up = the 1-GPU step time over the 2-GPU one (the same global batch).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from pathlib import Path

NGPU = int(os.environ.get("NGPU", "2"))   # the GPUs bench/dist_scale.sh gave rl8b and align8b
RUNS = [("rl4b_1", "RL step, 4B, 16 prompts x 8 x 512 tokens", 1), ("rl4b_2", "same", 2),
        ("rl8b", "RL step, 8B, 2 prompts x 8 x 8,192 tokens", NGPU),
        ("align8b", "alignment step, 8B policy + 2B-upcycled 4-expert disc, 2 prompts x 16 x 6,144 tokens", NGPU)]


def steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "timing/step_s" in r] if path.exists() else []


def smi_peaks(path: Path) -> dict[int, float]:
    """Largest used memory per GPU index, GiB."""
    peaks: dict[int, float] = {}
    if path.exists():
        for row in csv.reader(path.read_text().splitlines()):
            if len(row) == 2 and row[0].strip().isdigit():
                i, mib = int(row[0]), float(row[1])
                peaks[i] = max(peaks.get(i, 0.0), mib / 1024)
    return peaks


def summary(rows: list[dict]) -> dict:
    timed = rows[1:] if len(rows) > 1 else rows
    out = {"step_s": statistics.median(r["timing/step_s"] for r in timed), "steps": len(rows)}
    split = [k for k in timed[-1] if k.startswith("timing/") and k not in ("timing/step_s", "timing/tokens_per_s")]
    out["split"] = ", ".join(f"{k[7:-2]} {statistics.median(r.get(k, 0.0) for r in timed):.1f}" for k in split)
    out["rank0_peak"] = max((r.get("memory/peak_gib", 0.0) for r in rows), default=0.0)
    return out


SCALE = "RL step, 4B, 32 prompts x 16 x 2,048 tokens (issue 17)"
RECIPE = (500, 1500)   # the paper's alignment and RL step counts


def scaling(out_dir: Path) -> None:
    """Issue 17's table: step time, tokens/s per GPU, efficiency against 1 GPU, peak per card."""
    runs = {n: steps(out_dir / f"scale{n}.metrics.jsonl") for n in (1, 2, 4, 8)}
    runs = {n: r for n, r in runs.items() if r}
    if not runs:
        return
    print(f"\n{SCALE}\n\n| GPUs | step (s) | tokens/s per GPU | efficiency vs 1 GPU | peak per card, nvidia-smi (GiB) |")
    print("|---|---|---|---|---|")
    base = summary(runs[1])["step_s"] if 1 in runs else None
    for n, rows in runs.items():
        s = summary(rows)
        tok = statistics.median(r["timing/tokens_per_s"] for r in (rows[1:] or rows) if "timing/tokens_per_s" in r)
        eff = f"{base / (n * s['step_s']):.0%}" if base else "n/a (no 1-GPU run)"
        peaks = smi_peaks(out_dir / f"smi_scale{n}.csv")
        cards = " / ".join(f"{peaks[i]:.0f}" for i in sorted(peaks)[:n]) if peaks else "n/a"
        print(f"| {n} | {s['step_s']:.1f} | {tok / n:,.0f} | {eff} | {cards} |")


def recipe(out_dir: Path) -> None:
    """Wall clock of the paper's step counts at the measured 8B step times (one step each)."""
    a, r = steps(out_dir / "align8b.metrics.jsonl"), steps(out_dir / "rl8b.metrics.jsonl")
    if a and r:
        hours = (RECIPE[0] * summary(a)["step_s"] + RECIPE[1] * summary(r)["step_s"]) / 3600
        print(f"\nrecipe estimate: {RECIPE[0]} alignment + {RECIPE[1]} RL steps at these step times: {hours:.1f} h "
              "(SFT, warm-up, evaluation and checkpoints not counted)")


def main(out: str) -> int:
    out_dir = Path(out)
    print("| run | GPUs | step (s) | speed-up | peak per card, nvidia-smi (GiB) "
          "| rank-0 allocated peak (GiB) | split (s) |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, label, gpus in RUNS:
        rows = steps(out_dir / f"{name}.metrics.jsonl")
        if not rows:
            print(f"| {label} | {gpus} | not run or no step logged | | | | |")
            continue
        s = summary(rows)
        peaks = smi_peaks(out_dir / f"smi_{name}.csv")
        if name == "rl4b_1":
            base = s["step_s"]
        speed = f"{base / s['step_s']:.2f}x" if name == "rl4b_2" and base else ""
        cards = " / ".join(f"{peaks[i]:.1f}" for i in sorted(peaks)[:gpus]) if peaks else "n/a"
        print(f"| {label} | {gpus} | {s['step_s']:.1f} | {speed} | {cards} | {s['rank0_peak']:.1f} | {s['split']} |")
    scaling(out_dir)
    recipe(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
