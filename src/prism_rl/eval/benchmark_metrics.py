"""Each benchmark's headline number, computed as the benchmark's own evaluation computes it.

:func:`headline` takes the sample rows (``acc`` or ``rule_acc`` 0/1 and ``meta``, the record's
metadata) and returns the number the benchmark publishes, its details and notes
(docs/BENCHMARKS.md):

=================  ==========================================================================
MathVista, MathVision, MMMU   accuracy = correct records / records
MathVerse          accuracy over the records of the five versions with a diagram; Text Only
                   (released apart, "to ablate") is reported per version but left out
WeMath             the four-dimensional metric's strict score (loose beside it)
MMMU-Pro           (standard accuracy + vision accuracy) / 2, only when both settings are there
HallusionBench     aAcc = correct questions / questions (qAcc and fAcc beside it)
=================  ==========================================================================

:func:`breakdown` gives accuracy per value of each metadata key (subject, level, concept,
version ...), the per-record metadata broken out for ``summary.json``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Headline", "breakdown", "details_text", "hallusion_scores", "headline", "mathverse_scores", "mmmu_pro_scores",
           "wemath_scores"]

TEXT_ONLY = "Text Only"


@dataclass
class Headline:
    """The headline value (``None`` when the data cannot give it), its details, and notes."""

    value: float | None
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _meta(r: dict) -> dict:
    return r.get("meta") or {}


# --------------------------------------------------------------------------- MathVerse


def mathverse_scores(rows: list[dict], key: str = "acc") -> dict:
    """Accuracy per ``problem_version`` and ``overall`` = mean of ``key`` over the rows that are
    not Text Only (all rows when every row is): MathVerse's overall score is over testmini's
    five diagram versions, 788 problems each, so it is also the mean of the five."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        per[str(_meta(r).get("problem_version") or "?")].append(r[key])
    scored = [r[key] for r in rows if _meta(r).get("problem_version") != TEXT_ONLY] or [r[key] for r in rows]
    return {"overall": _mean(scored), "n_overall": len(scored),
            "per_version": {v: {"n": len(x), "accuracy": _mean(x)} for v, x in sorted(per.items())}}


# --------------------------------------------------------------------------- WeMath


def _wemath_problems(rows: list[dict], key: str) -> tuple[list[tuple[int, list[bool], bool]], int]:
    """Complete multi-step problems as (steps n, [step 1..n correct], multi-step correct), and
    how many problems miss a sub-problem (left out). A problem is its ``ID`` among the rows
    whose ``key`` starts ``{n}steps``."""
    groups: dict[tuple[int, str], dict[str, bool]] = defaultdict(dict)
    for r in rows:
        m = _meta(r)
        k, pid = str(m.get("key") or ""), m.get("ID")
        head = k.split("steps")[0]
        if pid and "steps_" in k and head.isdigit():
            groups[(int(head), str(pid))][k.split("_", 1)[1]] = bool(r[key])
    done, incomplete = [], 0
    for (n, _), subs in sorted(groups.items()):
        names = [str(i) for i in range(1, n + 1)] + ["multi"]
        if not all(x in subs for x in names):
            incomplete += 1
            continue
        done.append((n, [subs[str(i)] for i in range(1, n + 1)], subs["multi"]))
    return done, incomplete


def wemath_scores(rows: list[dict], key: str = "acc") -> dict | None:
    """We-Math's four-dimensional metric over the N complete multi-step problems (525 on
    testmini, the constant of its ``four_dimensional_metrics.py``)::

        IK (insufficient knowledge)   some step wrong     and the multi-step question wrong
        IG (inadequate generalisation) every step right   and the multi-step question wrong
        CM strict (complete mastery)  every step right    and the multi-step question right
        CM loose                      some step right     and the multi-step question right
        RM strict (rote memorisation) some step wrong     and the multi-step question right
        RM loose                      every step wrong    and the multi-step question right
        score_strict = (N - 0.5 IG - RM_strict - IK) / N     score_loose with RM_loose
        rates: IK, IG, CM over N; RM over (CM + RM)
        S1 = accuracy on the one-step sub-problems, S2 / S3 = on the 2-step / 3-step questions

    ``None`` when no problem is complete.
    """
    problems, incomplete = _wemath_problems(rows, key)
    if not problems:
        return None
    c: dict[str, int] = defaultdict(int)
    for _, steps, multi in problems:
        all_ok, any_ok = all(steps), any(steps)
        c["IK"] += (not all_ok) and not multi
        c["IG"] += all_ok and not multi
        c["CM_strict"] += all_ok and multi
        c["CM_loose"] += any_ok and multi
        c["RM_strict"] += (not all_ok) and multi
        c["RM_loose"] += (not any_ok) and multi
    n = len(problems)
    out = {"problems": n, "incomplete_problems": incomplete, **dict(c)}
    out["score_strict"] = (n - 0.5 * c["IG"] - c["RM_strict"] - c["IK"]) / n
    out["score_loose"] = (n - 0.5 * c["IG"] - c["RM_loose"] - c["IK"]) / n
    for name in ("IK", "IG", "CM_strict", "CM_loose"):
        out[f"{name}_rate"] = c[name] / n
    for kind in ("strict", "loose"):
        rm, cm = c[f"RM_{kind}"], c[f"CM_{kind}"]
        out[f"RM_{kind}_rate"] = rm / (rm + cm) if rm + cm else 0.0
    out["S1"] = _mean([float(s) for _, steps, _ in problems for s in steps])
    for k in (2, 3):
        out[f"S{k}"] = _mean([float(m) for n_steps, _, m in problems if n_steps == k]) if any(
            p[0] == k for p in problems) else None
    return out


# --------------------------------------------------------------------------- HallusionBench


def _all_correct_share(groups: dict[tuple, list[float]]) -> float:
    return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0


def hallusion_scores(rows: list[dict], key: str = "acc") -> dict | None:
    """HallusionBench's three accuracies (its ``utils.py``: ``get_eval_all``,
    ``get_eval_pair_all``, ``get_eval_fig``)::

        aAcc = correct questions / questions
        qAcc = question groups (category, subcategory, set_id, question_id: one question asked
               of the original and the edited figures) with every answer right / groups
        fAcc = figures (category, subcategory, set_id, figure_id) with every question right /
               figures; a VS question with figure_id 0 has no figure and is in no figure

    ``None`` when the rows carry no HallusionBench ids.
    """
    pairs: dict[tuple, list[float]] = defaultdict(list)
    figs: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        m = _meta(r)
        if not m.get("category"):
            continue
        base = (m["category"], m.get("subcategory"), m.get("set_id"))
        pairs[(*base, m.get("question_id"))].append(r[key])
        if not (m["category"] == "VS" and str(m.get("figure_id")) == "0"):
            figs[(*base, m.get("figure_id"))].append(r[key])
    if not pairs:
        return None
    return {"aAcc": _mean([r[key] for r in rows]), "qAcc": _all_correct_share(pairs),
            "fAcc": _all_correct_share(figs), "questions": len(rows), "question_groups": len(pairs),
            "figures": len(figs)}


# --------------------------------------------------------------------------- MMMU-Pro

PRO_SETTINGS = ("standard", "vision")


def mmmu_pro_scores(rows: list[dict], key: str = "acc") -> dict:
    """Accuracy per setting and ``overall`` = (standard + vision) / 2, MMMU-Pro's score, or
    ``None`` when a setting is missing (one setting alone is not the MMMU-Pro score)."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        setting = _meta(r).get("setting") or str(r.get("task", "")).rpartition("/")[2]
        per[setting].append(r[key])
    out: dict = {s: (_mean(per[s]) if per[s] else None) for s in PRO_SETTINGS}
    out.update({f"n_{s}": len(per[s]) for s in PRO_SETTINGS})
    present = [s for s in PRO_SETTINGS if per[s]]
    out["overall"] = _mean([out[s] for s in present]) if len(present) == len(PRO_SETTINGS) else None
    return out


# --------------------------------------------------------------------------- dispatch


def _mmmu_pro_headline(rows: list[dict], key: str) -> Headline:
    s = mmmu_pro_scores(rows, key)
    notes = []
    missing = [x for x in PRO_SETTINGS if s[f"n_{x}"] == 0]
    if missing and len(missing) < len(PRO_SETTINGS):
        have = next(x for x in PRO_SETTINGS if x not in missing)
        notes.append(f"MMMU-Pro: only the {have} setting was evaluated ({100 * s[have]:.1f}%); the {missing[0]} "
                     f"setting is missing, so there is no MMMU-Pro score (the mean of both settings)")
    return Headline(s["overall"], s, notes)


def headline(name: str, rows: list[dict], key: str = "acc") -> Headline:
    """Benchmark ``name``'s headline over ``rows``, from the 0/1 column ``key`` (``acc``: after
    the judge; ``rule_acc``: the rules alone). See the module docstring for each formula."""
    if name == "mathverse":
        s = mathverse_scores(rows, key)
        excluded = len(rows) - s["n_overall"]
        notes = [f"MathVerse: {excluded} Text Only records reported per version, not in the overall score"] \
            if excluded else []
        return Headline(s["overall"], s, notes)
    if name == "wemath":
        s = wemath_scores(rows, key)
        if s is None:
            return Headline(None, {}, ["WeMath: no complete multi-step problem (each needs its steps and its "
                                       "multi-step question), so no four-dimensional score"])
        notes = [f"WeMath: {s['incomplete_problems']} problems lack a sub-problem and are left out"] \
            if s["incomplete_problems"] else []
        return Headline(s["score_strict"], s, notes)
    if name == "mmmu_pro":
        return _mmmu_pro_headline(rows, key)
    if name == "hallusionbench":
        s = hallusion_scores(rows, key)
        return Headline(s["aAcc"] if s else _mean([r[key] for r in rows]), s or {})
    return Headline(_mean([r[key] for r in rows]))


def breakdown(rows: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """``{key: {value: {"n", "accuracy"}}}``: accuracy (``acc``) of the rows whose metadata has
    that value; a list value (MathVista's skills) counts the row under each of its items."""
    out: dict[str, dict[str, dict]] = {}
    for k in keys:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            v = _meta(r).get(k)
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if item not in (None, ""):
                    groups[str(item)].append(r["acc"])
        if groups:
            out[k] = {v: {"n": len(x), "accuracy": _mean(x)} for v, x in sorted(groups.items())}
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def details_text(summary: dict) -> str:
    """One line of the numbers beside a summary's headline (console line, results table)."""
    name, d = summary.get("benchmark"), summary.get(summary.get("benchmark") or "", {}) or {}
    if name == "mathverse" and d.get("per_version"):
        return "; ".join(f"{v} {_pct(x['accuracy'])}" for v, x in d["per_version"].items())
    if name == "wemath" and d:
        return (f"loose {_pct(d['score_loose'])}; strict IK {d['IK']}, IG {d['IG']}, CM {d['CM_strict']}, "
                f"RM {d['RM_strict']} of {d['problems']} problems; sub-problem accuracy "
                f"{_pct(summary.get('record_accuracy'))}")
    if name == "mmmu_pro" and d:
        return f"standard {_pct(d.get('standard'))} (n {d['n_standard']}), vision {_pct(d.get('vision'))} (n {d['n_vision']})"
    if name == "hallusionbench" and d:
        return f"qAcc {_pct(d['qAcc'])}, fAcc {_pct(d['fAcc'])}"
    return ""
