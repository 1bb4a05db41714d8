"""Scoring benchmark answers: the verifiable reward's rules, the LLM judge fallback, summaries.

``score_response`` turns one response into a sample row (rules only; the row carries the
record's metadata); ``judge_rows`` asks the judge about the rows the rules call wrong, showing
it what the benchmark's own judge is shown (the record's ``judge_question`` and
``judge_reference``: MathVerse's ``question_for_eval``, HallusionBench's answer details ...);
``summarize_benchmark`` gives the benchmark's headline number as it defines it
(``benchmark_metrics``), format rate, lengths, judge counts and the metadata breakdown.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..data.records import IMAGE_PLACEHOLDER, Record
from ..format import extract_answer
from ..reward import compute_score, is_correct
from .benchmark_metrics import breakdown, headline
from .benchmark_table import get_benchmark

__all__ = ["judge_input", "judge_rows", "rule_correct", "score_response", "summarize_benchmark", "yes_no_word"]


_FIRST_WORD_RE = re.compile(r"[A-Za-z]+")


def yes_no_word(answer: str) -> str | None:
    """``yes``/``no`` when the answer's first word is one (``Yes, they are equal.``), else ``None``."""
    m = _FIRST_WORD_RE.search(answer)
    word = m.group(0).lower() if m else ""
    return word if word in ("yes", "no") else None


def rule_correct(answer: str | None, record: Record) -> bool:
    """The verifiable reward's rules on ``answer`` against every accepted form of the truth;
    for a yes/no question (HallusionBench, asked without an answer-form instruction) an answer
    whose first word is ``yes``/``no`` is read as that word."""
    if answer is None or not answer.strip():
        return False
    accepted = record.extra.get("accepted") or [record.ground_truth or ""]
    if any(is_correct(answer, gt) for gt in accepted):
        return True
    word = yes_no_word(answer) if record.extra.get("yes_no") else None
    return word is not None and word == (record.ground_truth or "").lower()


def score_response(record: Record, response: str, tokens: int = 0, finish: str = "stop") -> dict:
    """One sample row, scored by rules only (the judge comes later, see :func:`judge_rows`).

    ``answer`` is the last ``<answer>`` block even when the rest of the response is malformed;
    ``format`` is the strict whole-response check of the reward.
    """
    gt = record.ground_truth or ""
    res = compute_score(response, gt)
    answer = extract_answer(response)
    if res.format and (record.extra.get("accepted") or [gt]) == [gt]:
        # the reward already checked this answer against this truth
        ok = bool(res.acc) or (bool(record.extra.get("yes_no")) and yes_no_word(answer or "") == gt.lower())
    else:
        ok = rule_correct(answer, record)
    fmt = res.format
    return {
        "id": record.id, "task": record.task, "question": record.question,
        "ground_truth": record.ground_truth, "response": response, "answer": answer,
        "rule_acc": float(ok), "acc": float(ok), "format": float(fmt), "tokens": int(tokens),
        "finish": finish, "judge": "not_needed" if ok else "off", "judge_error": None,
        "meta": record.extra.get("meta") or {},
    }


def judge_input(record: Record, answer: str) -> tuple[str, str, str]:
    """``(question, reference, answer)`` for the judge: the benchmark's own judge inputs the
    loader put in ``extra`` (the user turn, images as ``[image]``, when it put none)."""
    shown = record.messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "[image]").strip()
    reference = record.extra.get("judge_reference") or record.extra.get("gt_display") or record.ground_truth or ""
    return record.extra.get("judge_question") or shown, reference, answer


def judge_rows(rows: list[dict], records: dict[str, Record], judge) -> None:
    """Ask ``judge`` about every rule-wrong row that has an answer; update rows in place.

    ``judge`` is the row's outcome: ``correct``/``incorrect`` (a verdict), ``error`` or
    ``unparsed`` (not judged, reason in ``judge_error``), ``no_answer`` (nothing to judge),
    ``not_needed`` (the rules said correct).
    """
    todo = []
    for row in rows:
        if row["rule_acc"]:
            continue
        if not row["answer"]:
            row["judge"] = "no_answer"
            continue
        todo.append(row)
    if not todo:
        return
    items = [judge_input(records[row["id"]], row["answer"]) for row in todo]
    for row, res in zip(todo, judge.judge_many(items)):
        row["judge"] = res.status
        row["judge_error"] = res.error
        if res.verdict:
            row["acc"] = 1.0


# --------------------------------------------------------------------------- summaries


def summarize_benchmark(name: str, rows: list[dict]) -> dict:
    """A benchmark's summary: ``accuracy`` is its headline number as the benchmark defines it
    (``prism_rl.eval.benchmark_metrics``: WeMath's strict score, MMMU-Pro's mean of its two
    settings or ``None`` with one missing, HallusionBench's aAcc, ...), ``rule_accuracy`` the
    same number from the rules alone; ``record_accuracy`` the plain mean over records; then
    format rate, mean response tokens, judge counts, per-task stats, the benchmark's details
    (``summary[name]``), accuracy per metadata value (``by_meta``) and ``notes``.
    """
    from .evaluate import summarize

    spec = get_benchmark(name)
    base = summarize(rows)
    n = max(len(rows), 1)
    head, head_rules = headline(spec.name, rows, "acc"), headline(spec.name, rows, "rule_acc")
    status = defaultdict(int)
    for r in rows:
        status[r.get("judge", "off")] += 1
    out = {
        "benchmark": spec.name, "label": spec.label, "n_records": len(rows),
        "headline": spec.headline, "accuracy": head.value, "rule_accuracy": head_rules.value,
        "record_accuracy": base["overall"]["accuracy"], "record_rule_accuracy": sum(r["rule_acc"] for r in rows) / n,
        "format_rate": base["overall"]["format_rate"],
        "mean_response_tokens": base["overall"]["mean_response_tokens"],
        "truncated_rate": base["overall"]["truncated_rate"],
        "judged": status["correct"] + status["incorrect"],
        "judge_flipped": status["correct"],
        "judge_failed": status["error"] + status["unparsed"],
        "judge_status": dict(status),
        "per_task": base["per_task"],
        "by_meta": breakdown(rows, spec.breakdown),
        "notes": head.notes,
    }
    if head.details:
        out[spec.name] = head.details
    return out
