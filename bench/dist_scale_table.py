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
import statistics
import sys
from pathlib import Path

RUNS = [("rl4b_1", "RL step, 4B, 16 prompts x 8 x 512 tokens", 1), ("rl4b_2", "same", 2),
        ("rl8b", "RL step, 8B, 2 prompts x 8 x 8,192 tokens", 2),
        ("align8b", "alignment step, 8B policy + 2B-upcycled 4-expert disc, 2 prompts x 16 x 6,144 tokens", 2)]


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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
