"""Compare two arms that one study's report does not pair (``prism eval`` runs made outside the
study harness, or arms of two study folders): per seed and mean ± std of accuracy and
perception, and the paired per-problem bootstrap interval of A minus B (``stage2_report``'s
statistics: each problem's difference averaged over the seeds both arms have).

Each arm is a list of ``prism eval`` run folders (or their ``samples.jsonl``),
one per seed, in seed order:

    python bench/paired_compare.py --a runs/other/eval/prism_grpo_s{0,1,2} \\
        --b runs/s2cpu/eval/grpo_s{0,1,2}/heldout-test [--a-name X --b-name Y] [--drop-empty]

``--drop-empty`` leaves out every problem that some seed of either arm answered with an empty
response at the token limit (a wave the graph engine lost before its fix, ``empty_audit.py``)
and says how many that was; without it they count as wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage2_report import _per_seed, mean_std, paired_bootstrap_ci, paired_diffs, read_rows  # noqa: E402


def samples_file(path: str) -> Path:
    """``samples.jsonl`` itself, or the one in a run folder (``heldout-test/`` or its parent)."""
    p = Path(path)
    for cand in (p, p / "samples.jsonl", p / "heldout-test" / "samples.jsonl"):
        if cand.is_file():
            return cand
    raise SystemExit(f"{path}: no samples.jsonl there (a prism eval run folder or the file itself)")


def run_name(path: str) -> str:
    """The eval run a path names: its folder, the parent of ``heldout-test/``, or the folder a
    samples.jsonl lies in (``<run>/heldout-test/samples.jsonl`` -> ``<run>``)."""
    p = Path(path)
    if p.name == "samples.jsonl":
        p = p.parent
    return p.parent.name if p.name == "heldout-test" else p.name


def drop_empty(*arms: dict[int, dict[str, dict]]) -> int:
    """Remove, from every seed of every arm, the problems some seed of some arm answered empty
    at the token limit; returns how many problems that was."""
    gone = {i for rows in arms for seed in rows.values() for i, r in seed.items() if r["empty_at_limit"]}
    for rows in arms:
        for seed in rows.values():
            for i in gone:
                seed.pop(i, None)
    return len(gone)


def compare(a: list[str], b: list[str], skip_empty: bool = False) -> dict:
    """Per-seed metrics of both arms and A - B paired intervals (points) for acc and perception
    (``skip_empty``: on the problems :func:`drop_empty` keeps)."""
    rows_a = {s: read_rows(samples_file(p)) for s, p in enumerate(a)}
    rows_b = {s: read_rows(samples_file(p)) for s, p in enumerate(b)}
    dropped = drop_empty(rows_a, rows_b) if skip_empty else 0
    out = {"a": {s: _per_seed(r) for s, r in rows_a.items()}, "b": {s: _per_seed(r) for s, r in rows_b.items()},
           "dropped": dropped}
    for m in ("acc", "perception"):
        diffs, seeds = paired_diffs(rows_a, rows_b, m)
        if diffs:
            mean, lo, hi = paired_bootstrap_ci(diffs)
            out[m] = {"mean": 100 * mean, "lo": 100 * lo, "hi": 100 * hi, "problems": len(diffs), "seeds": seeds}
    return out


def render(res: dict, a_name: str, b_name: str) -> str:
    lines = [f"left out: {res['dropped']} problems answered empty at the token limit"] if res.get("dropped") else []
    for key, name in (("a", a_name), ("b", b_name)):
        accs = [100 * v["acc"] for v in res[key].values() if v["acc"] is not None]
        if not accs:
            lines.append(f"{name}: no problems left")
            continue
        perc = [100 * v["perception"] for v in res[key].values() if v["perception"] is not None]
        m, s = mean_std(accs)
        pm = f", perception {mean_std(perc)[0]:.1f} ± {mean_std(perc)[1]:.1f}" if perc else ""
        lines.append(f"{name}: accuracy {m:.1f} ± {s:.1f} ({', '.join(f'{x:.1f}' for x in accs)}){pm}")
    for m in ("acc", "perception"):
        if m in res:
            e = res[m]
            lines.append(f"{a_name} - {b_name} {m}: {e['mean']:+.1f} [{e['lo']:+.1f}, {e['hi']:+.1f}] "
                         f"({e['problems']} problems, seeds {e['seeds']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, help="arm A's eval folders, one per seed")
    ap.add_argument("--b", nargs="+", required=True, help="arm B's eval folders, one per seed (same order)")
    ap.add_argument("--a-name", default="A")
    ap.add_argument("--b-name", default="B")
    ap.add_argument("--drop-empty", action="store_true",
                    help="leave out problems any seed of either arm answered empty at the token limit")
    a = ap.parse_args(argv)
    print(render(compare(a.a, a.b, a.drop_empty), a.a_name, a.b_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
