"""Print the table of bench/rl_gpu_scale.sh: per arm the step scored, greedy held-out accuracy
on both held-out sets, sampled training accuracy early vs late, and seconds per step.

Usage: python bench/rl_scale_table.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# where `prism eval ... output_dir=ARM/eval name=policy` puts an arm's results (see rl_gpu_scale.sh)
EVAL, EVAL2 = Path("eval/policy/heldout-test"), Path("eval2/policy/heldout-test2")


def accuracy(summary: Path) -> str:
    if not summary.exists():
        return "-"
    s = json.loads(summary.read_text())
    return f"{s['overall']['accuracy'] * 100:.1f}" if "overall" in s else "-"


def per_problem(samples: Path) -> dict[str, float]:
    """Greedy correctness by problem id from an eval's samples.jsonl (n = 1)."""
    if not samples.exists():
        return {}
    return {r["id"]: r["acc"] for r in map(json.loads, samples.read_text().splitlines())}


def paired_gain(arm: dict[str, float], base: dict[str, float]) -> str:
    """Mean per-problem difference arm - base in points, with its standard error (paired)."""
    ids = sorted(arm.keys() & base.keys())
    if len(ids) < 2:
        return ""
    d = [arm[i] - base[i] for i in ids]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return f"{mean * 100:+.1f} ± {se * 100:.1f}"


def train_curve(metrics: Path) -> tuple[str, str, int]:
    """('acc first10 -> last10', 's/step', steps logged) from a run's metrics.jsonl."""
    if not metrics.exists():
        return "", "", 0
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "rollout/acc" in r]
    if len(rows) < 10:
        return "", "", len(rows)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    return (f"{mean(rows[:10], 'rollout/acc'):.3f} -> {mean(rows[-10:], 'rollout/acc'):.3f}",
            f"{mean(rows, 'timing/step_s'):.2f}", len(rows))


def main(out: Path) -> None:
    print("| arm | step scored | test 900 | test2 4000 | test2 gain over SFT (paired, ± s.e.) "
          "| train acc (first 10 -> last 10 steps) | s/step |")
    print("|---|---|---|---|---|---|---|")
    base = per_problem(out / "sft" / EVAL2 / "samples.jsonl")
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        evaluated = d / "evaluated.txt"
        step = evaluated.read_text().strip().rsplit("/", 1)[-1] if evaluated.exists() else "sft"
        curve, speed, _ = train_curve(d / "metrics.jsonl")
        print(f"| {d.name} | {step} | {accuracy(d / EVAL / 'summary.json')} | {accuracy(d / EVAL2 / 'summary.json')} "
              f"| {paired_gain(per_problem(d / EVAL2 / 'samples.jsonl'), base)} | {curve} | {speed} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
