"""Scoring benchmark answers: the verifiable reward's rules, the LLM judge fallback, summaries.

``score_response`` turns one response into a sample row (rules only); ``judge_rows`` asks the
judge about the rows the rules call wrong; ``summarize_benchmark`` gives a benchmark's
accuracy, format rate, lengths and judge counts, plus WeMath's four-dimensional metric and
HallusionBench's question-pair and figure accuracies.
"""

from __future__ import annotations

from collections import defaultdict

from ..data.records import IMAGE_PLACEHOLDER, Record
from ..format import extract_answer
from ..reward import compute_score, is_correct
from .benchmark_table import get_benchmark

__all__ = ["judge_rows", "rule_correct", "score_response", "summarize_benchmark"]


def rule_correct(answer: str | None, record: Record) -> bool:
    """The verifiable reward's rules on ``answer`` against every accepted form of the truth."""
    if answer is None or not answer.strip():
        return False
    accepted = record.extra.get("accepted") or [record.ground_truth or ""]
    return any(is_correct(answer, gt) for gt in accepted)


def score_response(record: Record, response: str, tokens: int = 0, finish: str = "stop") -> dict:
    """One sample row, scored by rules only (the judge comes later, see :func:`judge_rows`).

    ``answer`` is the last ``<answer>`` block even when the rest of the response is malformed;
    ``format`` is the strict whole-response check of the reward.
    """
    gt = record.ground_truth or ""
    res = compute_score(response, gt)
    answer = extract_answer(response)
    if res.format and (record.extra.get("accepted") or [gt]) == [gt]:
        ok = bool(res.acc)  # the reward already checked this answer against this truth
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
    items = []
    for row in todo:
        rec = records[row["id"]]
        shown = rec.messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "[image]").strip()
        items.append((rec.extra.get("judge_question") or shown,
                      rec.extra.get("gt_display") or rec.ground_truth or "", row["answer"]))
    for row, res in zip(todo, judge.judge_many(items)):
        row["judge"] = res.status
        row["judge_error"] = res.error
        if res.verdict:
            row["acc"] = 1.0


# --------------------------------------------------------------------------- summaries


def _wemath_scores(rows: list[dict]) -> dict | None:
    """WeMath's four-dimensional metric (insufficient knowledge, inadequate generalisation,
    complete mastery, rote memorisation) and its strict/loose scores, from rows with
    ``meta = {ID, key}``. ``None`` when no multi-step problem is complete enough."""
    by_problem: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in rows:
        m = r.get("meta") or {}
        if m.get("ID") and m.get("key"):
            by_problem[m["ID"]][m["key"]] = bool(r["acc"])
    counts = defaultdict(int)
    total = 0
    for steps in by_problem.values():
        multi_key = next((k for k in steps if k.endswith("steps_multi")), None)
        if multi_key is None:
            continue
        n = int(multi_key.split("steps")[0])
        parts = [steps.get(f"{n}steps_{i}") for i in range(1, n + 1)]
        multi = steps[multi_key]
        total += 1
        all_ok, any_ok = all(p is True for p in parts), any(p is True for p in parts)
        all_bad, any_bad = all(p is False for p in parts), any(p is False for p in parts)
        counts["IG"] += all_ok and not multi
        counts["IK"] += any_bad and not multi
        counts["CM_loose"] += any_ok and multi
        counts["CM_strict"] += all_ok and multi
        counts["RM_loose"] += all_bad and multi
        counts["RM_strict"] += any_bad and multi
    if total == 0:
        return None
    score = lambda rm: (total - 0.5 * counts["IG"] - counts[rm] - counts["IK"]) / total
    return {"problems": total, **dict(counts), "score_loose": score("RM_loose"),
            "score_strict": score("RM_strict")}


def _hallusion_scores(rows: list[dict]) -> dict | None:
    """HallusionBench's question-pair (qAcc) and figure (fAcc) accuracies next to aAcc."""
    pairs, figs = defaultdict(list), defaultdict(list)
    for r in rows:
        m = r.get("meta") or {}
        if not m.get("category"):
            continue
        pairs[(m["category"], m["subcategory"], m["set_id"], m["question_id"])].append(r["acc"])
        figs[(m["category"], m["subcategory"], m["set_id"], m["figure_id"])].append(r["acc"])
    if not pairs:
        return None
    frac = lambda groups: sum(all(v) for v in groups.values()) / len(groups)
    return {"aAcc": sum(r["acc"] for r in rows) / len(rows), "qAcc": frac(pairs), "fAcc": frac(figs)}


def summarize_benchmark(name: str, rows: list[dict]) -> dict:
    """Accuracy, format rate, mean response tokens and judge counts (plus per-task stats).

    MMMU-Pro's accuracy is the mean over its settings (standard, vision), as its paper
    reports it; every other benchmark's is the mean over records.
    """
    from .evaluate import summarize

    spec = get_benchmark(name)
    base = summarize(rows)
    n = max(len(rows), 1)
    accuracy = base["overall"]["accuracy"]
    if spec.name == "mmmu_pro" and len(base["per_task"]) > 1:
        accuracy = sum(t["accuracy"] for t in base["per_task"].values()) / len(base["per_task"])
    status = defaultdict(int)
    for r in rows:
        status[r.get("judge", "off")] += 1
    out = {
        "benchmark": spec.name, "label": spec.label, "n_records": len(rows),
        "accuracy": accuracy, "rule_accuracy": sum(r["rule_acc"] for r in rows) / n,
        "format_rate": base["overall"]["format_rate"],
        "mean_response_tokens": base["overall"]["mean_response_tokens"],
        "truncated_rate": base["overall"]["truncated_rate"],
        "judged": status["correct"] + status["incorrect"],
        "judge_flipped": status["correct"],
        "judge_failed": status["error"] + status["unparsed"],
        "judge_status": dict(status),
        "per_task": base["per_task"],
    }
    extra = {"wemath": _wemath_scores, "hallusionbench": _hallusion_scores}.get(spec.name)
    if extra is not None and (scores := extra(rows)) is not None:
        out[spec.name] = scores
    return out

