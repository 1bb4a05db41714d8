"""Re-score ``prism eval`` samples with this machine's verifiable reward and count where it
disagrees with the stored ``acc``.

Why: an evaluation run where math-verify could not be imported scored every answer that needed
the symbolic fallback 0 (the pool logged one warning; it now raises ``MathVerifyUnavailable``).
Re-scoring its samples here, where math-verify works, says how many answers that cost and which
way.

    python bench/rescore.py runs/stage2/eval/*/heldout-test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired_compare import run_name, samples_file  # noqa: E402

from prism_rl.reward.scoring import compute_score  # noqa: E402


def rescore(samples: Path) -> dict:
    """Counts over one samples.jsonl: rows, rows whose stored ``acc`` differs from a fresh
    ``compute_score`` (``gained``: stored 0, now 1; ``lost``: stored 1, now 0), and up to three
    examples of each as (answer, ground truth)."""
    out = {"rows": 0, "gained": 0, "lost": 0, "examples": []}
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        out["rows"] += 1
        now = compute_score(r["response"], str(r.get("ground_truth") or "")).acc
        if now != r["acc"]:
            out["gained" if now > r["acc"] else "lost"] += 1
            if len(out["examples"]) < 3:
                out["examples"].append((r.get("answer"), r.get("ground_truth")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="prism eval run folders (holding samples.jsonl) or the files")
    a = ap.parse_args(argv)
    print("| run | rows | stored 0, now 1 | stored 1, now 0 | examples (answer, truth) |\n|---|---|---|---|---|")
    total = {"rows": 0, "gained": 0, "lost": 0}
    for run in a.runs:
        c = rescore(samples_file(run))
        for k in total:
            total[k] += c[k]
        print(f"| {run_name(run)} | {c['rows']} | {c['gained']} | {c['lost']} | {c['examples'] or ''} |")
    print(f"| all | {total['rows']} | {total['gained']} | {total['lost']} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
