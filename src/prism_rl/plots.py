"""``prism plot RUN_DIR``: training curves from a run's ``metrics.jsonl`` as PNGs.

Works for every stage: it draws the panels whose metrics the run logged. For the alignment
stage this is the paper's training-dynamics figure: the teacher-minus-student score gap per
segment, the discriminator's loss and pair accuracy, the policy's format rate, perception
score (on synthetic problems) and response length, and the per-expert routing load.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .trainers.run import read_metrics  # noqa: E402

# (title, [metric keys]) - a panel is drawn when any of its keys was logged
PANELS = [
    ("teacher - student score gap", ["disc/cap_gap", "disc/reason_gap"]),
    ("discriminator loss", ["disc/loss", "disc/bt_cap", "disc/bt_reason"]),
    ("discriminator pair accuracy", ["disc/cap_acc", "disc/reason_acc", "disc/heldout_cap_acc",
                                     "disc/heldout_reason_acc"]),
    ("reward", ["rollout/reward", "rollout/reward_all"]),
    ("accuracy", ["rollout/acc", "eval/acc"]),
    ("format rate", ["rollout/format", "eval/format"]),
    ("perception score (caption facts right)", ["rollout/perception"]),
    ("response length (tokens)", ["rollout/response_len_mean"]),
    ("SFT loss", ["actor/loss"]),
    ("policy clip fraction", ["actor/clip_frac"]),
    ("entropy", ["actor/entropy"]),
    ("groups kept (dynamic sampling)", ["rollout/groups_kept"]),
    ("tokens / s", ["timing/tokens_per_s"]),
]
EXPERT_LOAD = "disc/expert_load"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "event" not in r]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def drawn_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """The panels of :data:`PANELS` that ``rows`` logged, each with the keys it logged."""
    panels = [(t, [k for k in keys if _series(rows, k)[0]]) for t, keys in PANELS]
    return [(t, keys) for t, keys in panels if keys]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``training_curves.png`` (and ``expert_load.png`` when routing was logged)."""
    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'}: no metrics to plot")
    panels = drawn_panels(rows)
    out = []
    if panels:
        cols = 3
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.9 * nrows), squeeze=False)
        for ax, (title, keys) in zip(axes.flat, panels):
            for k in keys:
                ax.plot(*_series(rows, k), label=k, lw=1.4)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(run.name)
        fig.tight_layout()
        out.append(run / "training_curves.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    loads = [(r["step"], r[EXPERT_LOAD]) for r in rows if isinstance(r.get(EXPERT_LOAD), list) and r[EXPERT_LOAD]]
    if loads:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for e in range(len(loads[0][1])):
            ax.plot([s for s, _ in loads], [v[e] for _, v in loads], label=f"expert {e}")
        ax.set_title("per-expert token load")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(run / "expert_load.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
