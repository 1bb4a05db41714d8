"""Which evaluation batches came back empty: per ``prism eval`` run, the responses that decode
to nothing and ran to the token limit, and, batch by batch in file order, ``E`` (every response
so), ``p`` (some) or ``.`` (none). Whole ``E`` batches are the sign of the graph engine's lost
waves (fixed: a wave whose rows all ended before the token limit came back as pad tokens); an
engine with NaN logits would show the same, but now raises ``NonfiniteLogits``.

    python bench/empty_audit.py runs/stage2/eval/*/heldout-test --batch 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired_compare import run_name, samples_file  # noqa: E402
from stage2_report import empty_at_limit  # noqa: E402


def audit(samples: Path, batch: int) -> tuple[int, int, str]:
    """(empty-at-limit responses, responses, batch pattern) of one samples.jsonl."""
    flags = [empty_at_limit(json.loads(line)) for line in samples.read_text().splitlines()]
    pattern = "".join("E" if all(chunk) else "p" if any(chunk) else "."
                      for chunk in (flags[i:i + batch] for i in range(0, len(flags), batch)))
    return sum(flags), len(flags), pattern


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="prism eval run folders (holding samples.jsonl) or the files")
    ap.add_argument("--batch", type=int, default=512, help="the evaluation's generation.batch_size")
    a = ap.parse_args(argv)
    print("| run | empty at limit | batches |\n|---|---|---|")
    for run in a.runs:
        n, total, pattern = audit(samples_file(run), a.batch)
        print(f"| {run_name(run)} | {n} / {total} | `{pattern}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
