"""The stage-2 study's alignment dynamics over steps, one figure for the whole study.

``prism plot RUN`` draws one alignment run. This module lines up every alignment run of a study
folder (``s<seed>/<data>/align/<variant>/metrics.jsonl``), groups them by ``<data>/<variant>``
and draws, per step, the mean over seeds with the seeds' range as a band: the teacher-minus-
student score gap per segment, the discriminator's pair accuracy on the step's batch, the
rollouts' perception score, accuracy and length, and the largest expert's share of the routed
tokens (``1/E`` when the load is even; absent for a dense discriminator).

    python bench/stage2_dynamics.py runs/s2cpu [runs/s2dense ...] --seeds 0,1,2 --out docs/stage2_dynamics.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (panel title, metric key) in drawing order; "disc/expert_load_max" is derived from the logged loads
PANELS = [
    ("caption gap (teacher - policy score)", "disc/cap_gap"),
    ("reasoning gap (teacher - policy score)", "disc/reason_gap"),
    ("discriminator caption pair accuracy", "disc/cap_acc"),
    ("discriminator reasoning pair accuracy", "disc/reason_acc"),
    ("rollout perception score", "rollout/perception"),
    ("rollout accuracy", "rollout/acc"),
    ("rollout response length (tokens)", "rollout/response_len_mean"),
    ("largest expert's share of tokens", "disc/expert_load_max"),
]


def step_rows(metrics: Path) -> list[dict]:
    """The per-step rows of one run's ``metrics.jsonl`` (events such as "start" are left out),
    each with ``disc/expert_load_max`` = max_e load_e added when the run logged expert loads."""
    rows = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "timing/step_s" not in r:
            continue
        load = r.get("disc/expert_load")
        if isinstance(load, list) and load:
            r["disc/expert_load_max"] = max(load)
        rows.append(r)
    return rows


def alignment_runs(out: Path, seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    """``{"<data>/<variant>": {seed: step rows}}`` for every alignment run of the study folder."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for s in seeds:
        for metrics in sorted((out / f"s{s}").glob("*/align/*/metrics.jsonl")):
            rows = step_rows(metrics)
            if rows:
                runs.setdefault(f"{metrics.parents[2].name}/{metrics.parent.name}", {})[s] = rows
    return runs


def step_series(by_seed: dict[int, list[dict]], key: str) -> dict[str, list]:
    """Per step that any seed logged ``key`` at: the mean over those seeds, their min and max, and
    how many there were. Seeds stopped early by a budget simply drop out of the later steps."""
    at: dict[int, list[float]] = {}
    for rows in by_seed.values():
        for r in rows:
            if isinstance(r.get(key), (int, float)):
                at.setdefault(int(r["step"]), []).append(float(r[key]))
    steps = sorted(at)
    return {"step": steps, "mean": [sum(at[t]) / len(at[t]) for t in steps], "lo": [min(at[t]) for t in steps],
            "hi": [max(at[t]) for t in steps], "n": [len(at[t]) for t in steps]}


def dynamics(outs: list[Path], seeds: list[int]) -> dict[str, dict[str, dict]]:
    """``{run name: {metric: step_series}}`` over the study folders (a name found in two folders
    is suffixed with the folder's name)."""
    res: dict[str, dict[str, dict]] = {}
    for out in outs:
        for name, by_seed in alignment_runs(out, seeds).items():
            label = name if name not in res else f"{name} ({out.name})"
            res[label] = {key: step_series(by_seed, key) for _, key in PANELS}
    return res


def plot(res: dict[str, dict[str, dict]], path: Path, title: str = "") -> Path:
    """One panel per metric of :data:`PANELS` that any run logged; a line per run (mean over its
    seeds) with the seeds' min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, k) for t, k in PANELS if any(series[k]["step"] for series in res.values())]
    if not panels:
        raise ValueError("no alignment metrics to plot: no s<seed>/*/align/*/metrics.jsonl with logged steps")
    cols = 4
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 3.0 * nrows), squeeze=False)
    # one colour per run in every panel (a run missing from a panel, e.g. a dense discriminator's
    # expert load, must not shift the others' colours)
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(res)}
    for ax, (t, key) in zip(axes.flat, panels):
        for name, series in res.items():
            s = series[key]
            if not s["step"]:
                continue
            ax.plot(s["step"], s["mean"], lw=1.4, color=colour[name], label=f"{name} (n={max(s['n'])})")
            ax.fill_between(s["step"], s["lo"], s["hi"], color=colour[name], alpha=0.15, lw=0)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("alignment step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+", type=Path, help="stage-2 study folders (--out of stage2_study.py)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds to read (missing ones are skipped)")
    ap.add_argument("--only", default="", help="comma-separated run names (<data>/<variant>) to draw; default all")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write; its .json twin gets the series")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    for out in a.outs:
        if not out.is_dir():
            ap.error(f"{out}: not a folder")
    res = dynamics(a.outs, [int(s) for s in a.seeds.split(",") if s.strip()])
    if a.only:
        wanted = [x.strip() for x in a.only.split(",") if x.strip()]
        missing = [w for w in wanted if w not in res]
        if missing:
            ap.error(f"--only: no alignment runs named {missing}; found {sorted(res)}")
        res = {w: res[w] for w in wanted}
    plot(res, a.out, a.title)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out} ({len(res)} runs: {', '.join(res)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
