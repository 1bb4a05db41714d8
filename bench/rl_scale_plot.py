"""Plot sampled training accuracy per step for bench/rl_gpu_scale.sh runs, one line per run,
coloured by rollout temperature (read from each run's name: t03 -> T 0.3, t06 -> T 0.6).

Usage: python bench/rl_scale_plot.py OUT.png RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smoothed(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main(png: str, run_dirs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"t03": "tab:blue", "t06": "tab:orange"}
    labelled = set()
    for d in map(Path, run_dirs):
        rows = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "rollout/acc" in r]
        key = d.name[:3]
        label = None if key in labelled else f"T 0.{key[2]} ({sum(p.name.startswith(key) for p in map(Path, run_dirs))} runs)"
        labelled.add(key)
        ax.plot([r["step"] for r in rows], smoothed([r["rollout/acc"] for r in rows]), color=colours.get(key, "gray"),
                alpha=0.7, lw=1, label=label)
    ax.set_xlabel("GRPO step (2,048 samples each)")
    ax.set_ylabel("sampled training accuracy (5-step mean)")
    ax.set_title("GRPO on the quick-start task, H100, 128 prompts x 16 samples per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(png)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
