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
discriminator can learn the content difference at all when nothing else separates the two
(the stage-2 study's ``content`` discriminator, ``bench/stage2_plan.py``).

No record is dropped silently: the records that give no pair are counted per reason
(``SKIPS``) and reported, by the probe (``records_skipped`` per discriminator) and by
``--write-pairs`` (printed, and with ``--out`` as JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
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


# Why a record of the pool gives no pair; each record is counted once, under the first that applies.
SKIPS = {
    "unknown_style": "its style is neither teacher nor public",
    "extra_teacher": "a second teacher demonstration of its problem (the first one is the teacher)",
    "no_public": "a teacher demonstration whose problem has no public one",
    "no_teacher": "a public demonstration whose problem has no teacher demonstration",
    "teacher_unsplittable": "a public demonstration whose teacher's response has no caption/reasoning split",
    "unknown_kind": "a public demonstration whose public_error is not none, perception or reasoning",
    "unsplittable": "its response cannot be split into caption and reasoning",
    "no_slip": "(--write-pairs only) a public demonstration without a slip: the same content as the teacher's",
}


def probe_pairs(records: list[Record]) -> tuple[dict[str, list[PairRecord]], Counter]:
    """Per slip kind, (teacher, public) pairs of the problems that have both demonstrations (the
    prompt built as ``prism disc pairs`` builds it, ``pair_prompt_record``); and the records that
    gave no pair, counted per reason of ``SKIPS``. Every public demonstration is in a pair or
    counted; a teacher demonstration is counted when it cannot be split, has no public one
    beside it, or is its problem's second."""
    by_problem: dict[str, list[Record]] = defaultdict(list)
    skipped: Counter = Counter()
    for r in records:
        if r.extra.get("style") in ("teacher", "public"):
            by_problem[r.extra.get("problem_id", r.id)].append(r)
        else:
            skipped["unknown_style"] += 1
    out: dict[str, list[PairRecord]] = {g: [] for g in GROUPS}
    for recs in by_problem.values():
        teachers = [r for r in recs if r.extra["style"] == "teacher"]
        publics = [r for r in recs if r.extra["style"] == "public"]
        if len(teachers) > 1:   # (adding 0 to a Counter would list the reason with a count of 0)
            skipped["extra_teacher"] += len(teachers) - 1
        t = _split(teachers[0]) if teachers else None
        if teachers and (t is None or not publics):
            skipped["unsplittable" if t is None else "no_public"] += 1
        prompt = pair_prompt_record(teachers[0]) if t is not None else None
        for r in publics:
            kind, s = r.extra.get("public_error"), _split(r)
            why = ("no_teacher" if not teachers else "teacher_unsplittable" if t is None
                   else "unknown_kind" if kind not in GROUPS else "unsplittable" if s is None else None)
            if why is not None:
                skipped[why] += 1
                continue
            out[kind].append(PairRecord(record=prompt, teacher_caption=t[0], student_caption=s[0],
                                        teacher_cot=t[1], student_cot=s[1]))
    return out, skipped


def _split(r: Record) -> tuple[str, str] | None:
    # a hand-made pool may hold a record without a response: it cannot be split either
    return split_text(r.response) if isinstance(r.response, str) else None


def skip_counts(skipped: Counter) -> dict[str, int]:
    """The nonzero counts of ``skipped``, in ``SKIPS`` order (stable JSON and printed output)."""
    return {k: skipped[k] for k in SKIPS if skipped[k]}


@torch.no_grad()
def probe(disc_dir: str, data: str, limit: int | None, batch_size: int, seed: int = 0,
          device: str = "cpu") -> dict[str, dict]:
    """``evaluate_pairs`` metrics per slip kind (at most ``limit`` pairs each, drawn with ``seed``),
    the discriminator in fp32 on ``device``."""
    disc = Discriminator.load(disc_dir, device, dtype=torch.float32).eval()
    processor = load_processor(disc_dir)
    cfg = WarmupDataConfig(train=data)
    configure_images(cfg)
    eos, _ = special_ids(processor)
    rng = random.Random(seed)
    groups, skipped = probe_pairs(read_records(data))
    result: dict[str, dict] = {}
    for kind, pairs in groups.items():
        if limit and len(pairs) > limit:
            pairs = rng.sample(pairs, limit)
        bad = BadRecords()
        items = pair_inputs(processor, pairs, cfg, eos, bad)
        result[kind] = {"pairs": 0}   # a kind without a scorable pair is listed, not left out
        if items:
            m = evaluate_pairs(disc, processor, items, batch_size)
            result[kind] = {k.removeprefix("heldout_"): v for k, v in m.items()}
        result[kind]["skipped"] = bad.count
    result["records_skipped"] = skip_counts(skipped)
    return result


def write_slip_pairs(data: str, out: str) -> dict:
    """Write ``data``'s teacher vs slipped-public pairs (perception and reasoning slips, shuffled
    with seed 0) to ``out`` as warm-up pairs; returns how many of each kind it wrote and the
    records it did not use, per reason (``no_slip``: the public demonstrations without a slip)."""
    groups, skipped = probe_pairs(read_records(data))
    pairs = groups["perception"] + groups["reasoning"]
    random.Random(0).shuffle(pairs)
    write_pairs(pairs, out)
    skipped["no_slip"] += len(groups["none"])
    return {"pairs": len(pairs), "perception": len(groups["perception"]), "reasoning": len(groups["reasoning"]),
            "records_skipped": skip_counts(skipped)}


def skipped_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"


def table(results: dict[str, dict[str, dict]]) -> str:
    """The metrics per discriminator and slip kind, then the records each pool gave no pair."""
    lines = ["| discriminator | public slip | pairs | caption acc | caption gap | reasoning acc | reasoning gap |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for kind in (k for k in GROUPS if k in res):
            m = res[kind]
            cells = (f"{m['cap_acc']:.2f} | {m['cap_gap']:+.2f} | {m['reason_acc']:.2f} | {m['reason_gap']:+.2f}"
                     if m["pairs"] else "- | - | - | -")
            lines.append(f"| {name} | {kind} | {m['pairs']} | {cells} |")
    lines += [f"records without a pair ({name}): {skipped_text(res['records_skipped'])}"
              for name, res in results.items() if "records_skipped" in res]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disc", action="append", default=[], help="a discriminator folder (repeatable)")
    ap.add_argument("--data", action="append", required=True, help="its SFT pool (sft.json), one per --disc")
    ap.add_argument("--name", action="append", help="a label per --disc (default: the folder)")
    ap.add_argument("--limit", type=int, default=150, help="pairs per slip kind (0: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None, help="where the discriminator runs (default: cuda when there is one)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, every core)")
    ap.add_argument("--out", help="write the metrics (with --write-pairs: what was written and skipped) as JSON here")
    ap.add_argument("--write-pairs", metavar="OUT.jsonl",
                    help="write --data's teacher vs slipped-public pairs (perception and reasoning) as warm-up pairs")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.write_pairs:
        if len(a.data) != 1:
            ap.error("--write-pairs takes one --data")
        report = write_slip_pairs(a.data[0], a.write_pairs)
        print(f"{a.write_pairs}: {report['pairs']} pairs ({report['perception']} perception, "
              f"{report['reasoning']} reasoning slips); records skipped: {skipped_text(report['records_skipped'])}")
        if a.out:   # written last: the study's pairs job is done once it exists
            Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    if not a.disc:
        ap.error("--disc is required (or --write-pairs)")
    if len(a.data) != len(a.disc) or (a.name and len(a.name) != len(a.disc)):
        ap.error("give one --data (and, if any, one --name) per --disc")
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for i, (d, data) in enumerate(zip(a.disc, a.data)):
        results[a.name[i] if a.name else d] = probe(d, data, a.limit or None, a.batch_size, device=device)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
