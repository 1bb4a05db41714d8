"""Discriminator warm-up pairs from curated demonstrations and policy samples (METHOD.md sections 3, 5).

``build_pairs`` joins, by problem id, the curated teacher demonstrations (the alignment
parquet that ``curate`` writes, with ``teacher_caption`` / ``teacher_cot``; any layout
``read_records`` reads works, teacher fields are then split from ``teacher_response`` or the
record's response) with policy samples (JSONL with ``id`` and ``response`` per line, e.g.
``prism eval``'s ``samples.jsonl``; several samples per id give several pairs), and writes
the warm-up pair JSONL with ``write_pairs`` (``question``, ``image`` as a data URL,
``teacher_caption``, ``student_caption``, ``teacher_cot``, ``student_cot``).

A student sample is segmented the way the discriminator segments a rollout: it must match
the reference format regex (not the stricter curation check, so an empty caption is still a
usable negative; ``split_text`` checks it in linear time, so tag soup cannot hang it); the
caption segment runs through ``</caption>``, the reasoning segment is the rest.
Format-invalid samples and samples whose id has no curated demonstration are skipped and
counted (in ``bad`` when given, and in the log); a malformed samples line (bad JSON,
missing ``id``/``response``) raises ``DataError`` naming the line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prism_rl.data.layouts import PairRecord, read_records, write_pairs
from prism_rl.data.records import BadRecords, DataError, Record
from prism_rl.format import SYSTEM_PROMPT, split_text

__all__ = ["build_pairs", "pair_prompt_record"]

log = logging.getLogger(__name__)


def build_pairs(curated_path: str | Path, policy_samples_path: str | Path,
                out_path: str | Path, *, bad: BadRecords | None = None) -> int:
    """Write warm-up pairs to ``out_path``; returns the number of pairs written."""
    teachers = {rec.id: (rec, _teacher_segments(rec)) for rec in read_records(curated_path)}
    bad = bad if bad is not None else BadRecords()
    pairs = []
    for line_no, sample in _samples(Path(policy_samples_path)):
        where = f"{policy_samples_path}, line {line_no}"
        found = teachers.get(sample["id"])
        if found is None:
            bad.add(where, f"no curated demonstration for id {sample['id']!r}")
            continue
        student = split_text(sample["response"])  # None when format-invalid
        if student is None:
            bad.add(where, "student response is format-invalid")
            continue
        rec, (t_caption, t_cot) = found
        pairs.append(PairRecord(record=pair_prompt_record(rec), teacher_caption=t_caption,
                                student_caption=student[0], teacher_cot=t_cot,
                                student_cot=student[1]))
    write_pairs(pairs, out_path)
    log.info("%s: %d pairs written; %s", out_path, len(pairs), bad.summary())
    return len(pairs)


def _teacher_segments(rec: Record) -> tuple[str, str]:
    """(caption, think + answer) of the teacher demonstration of ``rec``."""
    caption, cot = rec.extra.get("teacher_caption"), rec.extra.get("teacher_cot")
    if isinstance(caption, str) and isinstance(cot, str) and caption and cot:
        return caption, cot
    response = rec.extra.get("teacher_response") or rec.response
    split = split_text(response) if isinstance(response, str) else None
    if split is None:
        raise DataError(f"{rec.where('teacher_response')}: no format-valid teacher "
                        "demonstration (teacher_caption/teacher_cot or a response)")
    return split


def pair_prompt_record(rec: Record) -> Record:
    """The pair's prompt: the PRISM system prompt and the problem's own turns, no target."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                *(dict(m) for m in rec.messages if m["role"] != "system")]
    return Record(id=rec.id, messages=messages, images=rec.images,
                  ground_truth=rec.ground_truth, task=rec.task, source=rec.source,
                  index=rec.index)


def _samples(path: Path):
    """``(line number, {"id", "response"})`` for each non-blank line of a samples JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read policy samples: {e}") from e
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object")
        pid, response = obj.get("id"), obj.get("response")
        if isinstance(pid, int) and not isinstance(pid, bool):
            pid = str(pid)
        if not isinstance(pid, str) or not pid:
            raise DataError(f"{path}, line {n}, field 'id': missing or not a string")
        if not isinstance(response, str):
            raise DataError(f"{path}, line {n}, field 'response': missing or not a string")
        yield n, {"id": pid, "response": response}
