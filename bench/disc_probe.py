"""What a warmed-up discriminator rewards: content or style (issue 16's style control).

On a synthetic SFT pool (``prism data synth``), the problems that hold both the teacher's
demonstration and public ones give pairs whose only differences are known: a public
demonstration is either a copy of the teacher's content in the public template (``none``:
with ``--public-style teacher`` the two are the same text) or carries one slip in its caption
(``perception``) or its reasoning (``reasoning``). Each group is scored as warm-up pairs are
(``evaluate_pairs``: the teacher's segments against the public ones, dropout off):

    acc_seg = mean 1[D(teacher_seg) > D(public_seg)],   gap_seg = mean (D(teacher_seg) - D(public_seg))

A discriminator that rewards content gives ``gap_caption > 0`` on perception slips and
``gap_reasoning > 0`` on reasoning slips, and nothing on ``none``; one that rewards the
teacher's phrasing gives ``none`` a gap as large as the slips'.

    python bench/disc_probe.py --disc RUN/s0/varied/disc/moe/warmup/final --data RUN/data/varied/sft.json \\
        [--limit 150] [--out probe.json]

``--write-pairs OUT.jsonl --data POOL`` (no ``--disc``) writes the pool's teacher-vs-slipped-public
pairs as warm-up pairs instead: training on them (``prism disc warmup``) tells whether the
discriminator can learn the content difference at all when nothing else separates the two.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from prism_rl.config import WarmupDataConfig
from prism_rl.data.images import configure_images
from prism_rl.data.layouts import PairRecord, read_records, write_pairs
from prism_rl.data.pairs import pair_prompt_record
from prism_rl.data.records import BadRecords, Record
from prism_rl.format import split_text
from prism_rl.models.discriminator import Discriminator
from prism_rl.models.loading import load_processor, special_ids
from prism_rl.trainers.warmup import evaluate_pairs, pair_inputs

GROUPS = ("none", "perception", "reasoning")


def probe_pairs(records: list[Record]) -> dict[str, list[PairRecord]]:
    """Per slip kind, (teacher, public) pairs of the problems that have both demonstrations;
    the prompt is built as ``prism disc pairs`` builds it (``pair_prompt_record``)."""
    by_problem: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_problem[r.extra.get("problem_id", r.id)].append(r)
    out: dict[str, list[PairRecord]] = {g: [] for g in GROUPS}
    for recs in by_problem.values():
        teacher = next((r for r in recs if r.extra.get("style") == "teacher"), None)
        if teacher is None:
            continue
        t = split_text(teacher.response)
        prompt = pair_prompt_record(teacher)
        for r in recs:
            kind = r.extra.get("public_error")
            s = split_text(r.response) if r.extra.get("style") == "public" else None
            if t is None or s is None or kind not in out:
                continue
            out[kind].append(PairRecord(record=prompt, teacher_caption=t[0], student_caption=s[0],
                                        teacher_cot=t[1], student_cot=s[1]))
    return out


@torch.no_grad()
def probe(disc_dir: str, data: str, limit: int | None, batch_size: int, seed: int = 0) -> dict[str, dict]:
    """``evaluate_pairs`` metrics per slip kind (at most ``limit`` pairs each, drawn with ``seed``)."""
    disc = Discriminator.load(disc_dir, "cpu", dtype=torch.float32).eval()
    processor = load_processor(disc_dir)
    cfg = WarmupDataConfig(train=data)
    configure_images(cfg)
    eos, _ = special_ids(processor)
    rng = random.Random(seed)
    result = {}
    for kind, pairs in probe_pairs(read_records(data)).items():
        if limit and len(pairs) > limit:
            pairs = rng.sample(pairs, limit)
        bad = BadRecords()
        items = pair_inputs(processor, pairs, cfg, eos, bad)
        if items:
            m = evaluate_pairs(disc, processor, items, batch_size)
            result[kind] = {k.removeprefix("heldout_"): v for k, v in m.items()} | {"skipped": bad.count}
    return result


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| discriminator | public slip | pairs | caption acc | caption gap | reasoning acc | reasoning gap |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for kind, m in res.items():
            lines.append(f"| {name} | {kind} | {m['pairs']} | {m['cap_acc']:.2f} | {m['cap_gap']:+.2f} | "
                         f"{m['reason_acc']:.2f} | {m['reason_gap']:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disc", action="append", default=[], help="a discriminator folder (repeatable)")
    ap.add_argument("--data", action="append", required=True, help="its SFT pool (sft.json), one per --disc")
    ap.add_argument("--name", action="append", help="a label per --disc (default: the folder)")
    ap.add_argument("--limit", type=int, default=150, help="pairs per slip kind (0: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", help="write the metrics as JSON here")
    ap.add_argument("--write-pairs", metavar="OUT.jsonl",
                    help="write --data's teacher vs slipped-public pairs (perception and reasoning) as warm-up pairs")
    a = ap.parse_args(argv)
    if a.write_pairs:
        groups = probe_pairs(read_records(a.data[0]))
        pairs = groups["perception"] + groups["reasoning"]
        random.Random(0).shuffle(pairs)
        write_pairs(pairs, a.write_pairs)
        print(f"{a.write_pairs}: {len(pairs)} pairs ({len(groups['perception'])} perception, "
              f"{len(groups['reasoning'])} reasoning slips)")
        return 0
    if not a.disc:
        ap.error("--disc is required (or --write-pairs)")
    if len(a.data) != len(a.disc) or (a.name and len(a.name) != len(a.disc)):
        ap.error("give one --data (and, if any, one --name) per --disc")
    torch.manual_seed(0)
    results = {}
    for i, (d, data) in enumerate(zip(a.disc, a.data)):
        results[a.name[i] if a.name else d] = probe(d, data, a.limit or None, a.batch_size)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
