"""How long the demonstrations of a pool are, in a model's tokens, per task family and style,
and what share of them a rollout limit would cut off.

Why: the ``gpu`` preset's 128 new tokens cut off about 10% of the arith demonstrations, the
teacher's included, so those answers could never earn a reward and RL gained by learning to be
short (docs/RESULTS.md). Check a limit before a study:

    python bench/demo_lengths.py --data runs/stage2/data/matched/sft.json --tokenizer runs/stage2/s0/matched/tiny \\
        --limit 128 --limit 160
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

from transformers import AutoTokenizer

from prism_rl.data.layouts import read_records
from prism_rl.data.records import Record


def lengths(records: list[Record], tokenizer) -> dict[tuple[str, str], list[int]]:
    """Per (task, style): each record's response length in tokens, plus one for EOS (what a
    rollout must generate to end it); records without a response are left out."""
    out: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in records:
        if isinstance(r.response, str):
            out[(r.task, str(r.extra.get("style")))].append(len(tokenizer(r.response)["input_ids"]) + 1)
    return dict(out)


def table(by: dict[tuple[str, str], list[int]], limits: list[int]) -> str:
    head = "| task | style | records | mean | max | " + " | ".join(f"> {k} %" for k in limits) + " |"
    lines = [head, "|---" * (5 + len(limits)) + "|"]
    for (task, style), v in sorted(by.items()):
        over = " | ".join(f"{100 * sum(x > k for x in v) / len(v):.1f}" for k in limits)
        lines.append(f"| {task} | {style} | {len(v)} | {statistics.mean(v):.0f} | {max(v)} | {over} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an SFT pool (.json, .jsonl or .parquet, as prism sft reads it)")
    ap.add_argument("--tokenizer", required=True, help="a model or tokenizer folder")
    ap.add_argument("--limit", type=int, action="append", default=[], help="a rollout limit to check (repeatable)")
    a = ap.parse_args(argv)
    print(table(lengths(read_records(a.data), AutoTokenizer.from_pretrained(a.tokenizer)), a.limit or [128]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
