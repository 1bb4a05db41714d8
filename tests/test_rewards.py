"""Tests for ``prism_rl.reward``: the rule table, format failures, bounded time, plug-ins, JSONL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import pytest

import prism_rl
from prism_rl import reward as R
from prism_rl.format import make_response
from prism_rl.reward import math_verify_pool
from prism_rl.reward.multivalue import Multi, parse_multi

CAPTION = "- a diagram with labelled points"
THINK = "Step 1: read the figure. Step 2: compute."


def wrap(answer: str) -> str:
    """A format-valid response around ``answer``."""
    return make_response(CAPTION, THINK, answer)


# (answer, ground truth, expected acc, family): the accuracy a careful grader gives, not what the
# code happens to do. Every answer is wrapped in a format-valid response, so the score is
# 0.8 * acc + 0.2. Multi-value rule (see prism_rl.reward.matching): order matters unless the
# ground truth is a set (set braces, "or" alternatives, one variable given several values, ±).
TABLE = [
    # multiple-choice letters
    ("B", "B", 1, "choice"),
    ("(B)", "B", 1, "choice"),
    ("B.", "B", 1, "choice"),
    ("B)", "B", 1, "choice"),
    ("The answer is B", "B", 1, "choice"),
    ("Answer: (B) 30", "B", 1, "choice"),
    ("The answer is (D).", "D", 1, "choice"),
    ("(b)", "B", 1, "choice"),
    ("C", "B", 0, "choice"),
    ("(B) 30", "(A) 30", 0, "choice"),
    ("30", "(A) 30", 1, "choice"),
    ("A", "(A) 30", 1, "choice"),
    ("12 cm", "C. 12 cm", 1, "choice"),
    ("12", "C. 12 cm", 1, "choice"),
    ("C", "C. 12 cm", 1, "choice"),
    ("13 cm", "C. 12 cm", 0, "choice"),
    ("30", "B", 0, "choice"),
    # option letters written as a new user's model writes them (issue 11)
    ("b", "B", 1, "letter"),
    ("d)", "D", 1, "letter"),
    ("b) 30", "B", 1, "letter"),
    ("(c) 12 cm", "C. 12 cm", 1, "letter"),
    ("c", "C. 12 cm", 1, "letter"),
    ("\\text{A}", "A", 1, "letter"),
    ("\\textbf{A}", "A", 1, "letter"),
    ("$\\mathrm{(C)}$", "C", 1, "letter"),
    ("\\boxed{\\text{B}}", "B", 1, "letter"),
    ("Option A", "A", 1, "letter"),
    ("option (d)", "D", 1, "letter"),
    ("The answer is C because the area is 12.", "C", 1, "letter"),
    ("C, because the other options are too large", "C", 1, "letter"),
    ("(C) since 3 + 4 = 7", "C", 1, "letter"),
    ("A is correct", "A", 1, "letter"),
    # ... and what must not pass for a letter
    ("C and D", "C", 0, "letter"),  # two options picked
    ("C or D", "C", 0, "letter"),
    ("C, D", "C", 0, "letter"),
    ("b", "C", 0, "letter"),
    ("\\text{B}", "A", 0, "letter"),
    ("a", "(B) 30", 0, "letter"),
    ("A triangle has three sides", "A", 0, "letter"),  # the article, not option A
    ("All of the above", "A", 0, "letter"),
    ("Not A", "A", 0, "letter"),
    ("B is wrong", "B", 0, "letter"),
    ("C because B is too small", "B", 0, "letter"),  # picks C, only mentions B
    ("The answer is B because A is too small", "A", 0, "letter"),
    # exact match after normalisation
    ("Paris", "paris", 1, "exact"),
    ("Yes.", "yes", 1, "exact"),
    ("yes", "no", 0, "exact"),
    ("x = 2", "2", 1, "exact"),
    ("  7  ", "7", 1, "exact"),
    # numbers
    ("1,234", "1234", 1, "number"),
    ("1234", "1,234", 1, "number"),
    ("1,234,567.5", "1234567.5", 1, "number"),
    ("\u22123", "-3", 1, "number"),
    ("12 cm", "12", 1, "number"),
    ("45°", "45", 1, "number"),
    ("$3", "3", 1, "number"),
    ("50%", "50", 1, "number"),
    ("50\\%", "0.5", 1, "number"),
    ("0.5", "50", 0, "number"),
    ("3.0000001", "3", 1, "number"),
    ("3.0001", "3", 0, "number"),
    ("1e3", "1000", 1, "number"),
    ("2.5 m/s", "2.5", 1, "number"),
    ("24 square units", "24", 1, "number"),
    ("0.000001", "0", 0, "number"),
    ("2,3", "23", 0, "number"),
    # normalised text and LaTeX
    ("\\frac{1}{2}", "1/2", 1, "text"),
    ("\\dfrac{3}{4}", "0.75", 1, "text"),
    ("\\tfrac{x+1}{2}", "(x+1)/2", 1, "text"),
    ("\\text{Yes}", "yes", 1, "text"),
    ("30^\\circ", "30", 1, "text"),
    ("30^{\\circ}", "30°", 1, "text"),
    ("$\\boxed{7}$", "7", 1, "text"),
    ("\\(x^{2}\\)", "x^2", 1, "text"),
    ("\\[ 5 \\]", "5", 1, "text"),
    ("12\\,\\mathrm{cm}", "12", 1, "text"),
    ("\\left( 1, 2 \\right)", "(1,2)", 1, "text"),
    ("\\frac{\\pi}{2}", "\\pi/2", 1, "text"),
    # what was already right and must stay right (issue 11: "keep what is already right")
    ("2\\sqrt{2}", "\\sqrt{8}", 1, "kept"),
    ("\\sqrt8", "2\\sqrt2", 1, "kept"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", 1, "kept"),
    ("\\frac{3}{4}", "0.75", 1, "kept"),
    ("3/4", "\\dfrac{3}{4}", 1, "kept"),
    ("0.750", "3/4", 1, "kept"),
    ("-\\frac{1}{2}", "-0.5", 1, "kept"),
    ("75%", "0.75", 1, "kept"),
    ("75\\%", "75", 1, "kept"),
    ("12", "12 cm", 1, "kept"),
    ("5 \\text{ cm}^2", "5", 1, "kept"),
    ("13 cm", "12 cm", 0, "kept"),
    ("2.49", "2.5", 0, "kept"),
    ("\\$5", "5", 1, "kept"),
    ("3", "x = 3", 1, "kept"),
    ("2x+1", "y = 2x+1", 1, "kept"),
    ("No", "yes", 0, "kept"),
    ("0.5, \\frac{1}{2}", "1/2", 1, "kept"),  # one value, written twice: not a hedge
    ("(1, 2), (3, 4.0)", "(1,2),(3,4)", 1, "kept"),
    # ordered multi-part answers (issue 11): parts, comma lists, points
    ("(1) 3 (2) 5", "(1) 5 (2) 3", 0, "ordered"),  # the parts swapped
    ("(1) 5; (2) 3", "(1) 5 (2) 3", 1, "ordered"),
    ("(2) 3 (1) 5", "(1) 5 (2) 3", 1, "ordered"),  # matched by label, not by position
    ("5, 3", "(1) 5 (2) 3", 1, "ordered"),  # no labels: read in the truth's label order
    ("3, 5", "(1) 5 (2) 3", 0, "ordered"),
    ("1) 5, 2) 3", "(1) 5 (2) 3", 1, "ordered"),
    ("(1) 5", "(1) 5 (2) 3", 0, "ordered"),  # a part missing
    ("(a) \\frac{1}{2} (b) 4", "(a) 0.5 (b) 4", 1, "ordered"),
    ("(a) 4 (b) 0.5", "(a) 0.5 (b) 4", 0, "ordered"),
    ("(i) 12 cm (ii) 30^\\circ", "(i) 12 (ii) 30", 1, "ordered"),
    ("(1) 2\\sqrt{2} (2) 1", "(1) \\sqrt{8} (2) 1", 1, "ordered"),  # each part may use the fallback
    ("(1) 1 (2) 2\\sqrt{2}", "(1) \\sqrt{8} (2) 1", 0, "ordered"),  # ... but never across parts
    ("4, 3", "3,4", 0, "ordered"),
    ("2, 3", "3, 2", 0, "ordered"),  # this row and the next two said 1 before issue 11
    ("3, 2", "2,3", 0, "ordered"),
    ("2; 3", "3, 2", 0, "ordered"),
    ("3,4", "3, 4", 1, "ordered"),
    ("3; 4", "3, 4", 1, "ordered"),
    ("3 and 4", "3, 4", 1, "ordered"),
    ("\\sqrt{4}, 3", "3, 2", 0, "ordered"),
    ("3, \\sqrt{4}", "3, 2", 1, "ordered"),
    ("2, 3, 4", "2, 3", 0, "ordered"),
    ("2, 4", "3, 2", 0, "ordered"),
    ("2", "2, 3", 0, "ordered"),
    ("2, 3", "2", 0, "ordered"),  # two values for one: a hedge
    ("2 or 3", "2", 0, "ordered"),
    ("x=1, y=2", "y=2, x=1", 1, "ordered"),  # named values: matched by name
    ("x=4, y=3", "x=3, y=4", 0, "ordered"),
    ("x = 3, y = 4", "(3, 4)", 1, "ordered"),
    ("\\{1, 2, 3\\}", "3, 2, 1", 0, "ordered"),  # a set in the answer does not make the truth one
    # coordinate tuples (ordered, numeric tolerance)
    ("(1, 2)", "(1,2)", 1, "tuple"),
    ("(2, 1)", "(1, 2)", 0, "tuple"),
    ("(3, 4)", "(4, 3)", 0, "tuple"),
    ("(0.5, 2)", "(\\frac{1}{2}, 2)", 1, "tuple"),
    ("1, 2", "(1, 2)", 1, "tuple"),
    ("3, 4", "(4, 3)", 0, "tuple"),
    ("(1, 2.0000000001)", "(1, 2)", 1, "tuple"),
    ("(1, 2, 3)", "(1, 2)", 0, "tuple"),
    ("(\\sqrt{8}, 1)", "(2\\sqrt{2}, 1)", 1, "tuple"),
    ("(1, \\sqrt{8})", "(2\\sqrt{2}, 1)", 0, "tuple"),
    ("[1, 2]", "(1, 2)", 0, "tuple"),
    # genuine sets: the order is free only when the truth is one
    ("4, 3", "\\{3, 4\\}", 1, "set"),
    ("\\{4, 3\\}", "\\{3, 4\\}", 1, "set"),
    ("x \\in \\{4, 3\\}", "\\{3, 4\\}", 1, "set"),
    ("\\{\\sqrt{4}, 3\\}", "\\{3, 2\\}", 1, "set"),
    ("3, 5", "\\{3, 4\\}", 0, "set"),
    ("3, 4, 5", "\\{3, 4\\}", 0, "set"),
    ("4 or 3", "x = 3 or x = 4", 1, "set"),
    ("x = 4 \\text{ or } x = 3", "3 or 4", 1, "set"),
    ("x = 4, x = 3", "x = 3, x = 4", 1, "set"),  # one variable, two values: the solutions
    ("3", "3 or 4", 0, "set"),
    ("-2, 2", "\\pm 2", 1, "set"),
    ("\\pm 2", "2, -2", 1, "set"),  # a ± on either side is a pair of values
    ("x = \\pm 2", "-2, 2", 1, "set"),
    ("1 - \\sqrt{2}, 1 + \\sqrt{2}", "1 \\pm \\sqrt{2}", 1, "set"),
    ("2, 2", "\\pm 2", 0, "set"),
    ("2", "\\pm 2", 0, "set"),
    # math_verify fallback
    ("\\sqrt{8}", "2\\sqrt{2}", 1, "fallback"),
    ("(x+1)^2", "x^2+2x+1", 1, "fallback"),
    ("3\\times 10^{5}", "300000", 1, "fallback"),
    ("2^{10}", "1024", 1, "fallback"),
    ("\\sqrt{2}", "1.5", 0, "fallback"),
    # empty and overlong answers
    ("", "1", 0, "bounds"),
    ("1" * 1024, "1" * 1024, 0, "bounds"),
    ("1" * 1023, "1" * 1023, 1, "bounds"),
]


TABLE_IDS = [f"{i}:{c[3]}:{c[0][:20]}|{c[1][:12]}" for i, c in enumerate(TABLE)]


@pytest.mark.parametrize("answer,ground_truth,acc,family", TABLE, ids=TABLE_IDS)
def test_table(answer, ground_truth, acc, family):
    res = R.compute_score(wrap(answer), ground_truth, timeout_s=5)
    assert (res.acc, res.format) == (acc, 1.0), (family, res)
    assert res.score == pytest.approx(0.8 * acc + 0.2)
    assert R.is_correct(answer, ground_truth, timeout_s=5) is bool(acc)


def test_table_size_and_reasons():
    assert len(TABLE) >= 60
    assert R.compute_score(wrap(""), "1").reason == "empty_answer"
    assert R.compute_score(wrap("1" * 1024), "1").reason == "answer_too_long"
    assert R.check_answer("(B)", "B").reason == "match:choice"
    assert R.check_answer("1,234", "1234").reason == "match:number"
    assert R.check_answer("\\sqrt{8}", "2\\sqrt{2}").reason == "match:math_verify"
    assert R.check_answer("4, 3", "3,4").reason == "mismatch:list"
    assert R.check_answer("(1) 3 (2) 5", "(1) 5 (2) 3").reason == "mismatch:parts"
    assert R.check_answer("\\{4, 3\\}", "\\{3, 4\\}").reason == "match:set"
    assert R.check_answer("\\text{b}", "B").reason == "match:choice"


# (text, kind of its multi-value reading or None for one value): the rule deciding whether order counts
MULTI_KINDS = [
    ("\\{3, 4\\}", "set"),
    ("{3, 4}", "set"),
    ("x \\in \\{3, 4\\}", "set"),
    ("3 or 4", "set"),
    ("x = 3 \\text{ or } x = 4", "set"),
    ("x = 3, x = 4", "set"),
    ("\\pm 2", "set"),
    ("1 \\pm \\sqrt{2}", "set"),
    ("(1) 5 (2) 3", "parts"),
    ("(b) 3; (a) 5", "parts"),
    ("(i) 1 (ii) 2 (iii) 3", "parts"),
    ("1) 5, 2) 3", "parts"),
    ("x = 1, y = 2", "names"),
    ("(3, 4)", "tuple"),
    ("[1, 2)", "tuple"),
    ("3, 4", "list"),
    ("3; 4", "list"),
    ("3 and 4", "list"),
    ("(1) and (3)", "list"),  # statement numbers, not labels of parts
    ("(1, 2), (3, 4)", "list"),
    ("5", None),
    ("12\\,\\mathrm{cm}", None),
    ("(2) 3", None),
    ("(x+1)(x-1)", None),
    ("f(a, b)", None),
    ("\\{3\\}", "set"),
]


@pytest.mark.parametrize("text,kind", MULTI_KINDS)
def test_multi_value_kinds(text, kind):
    got = parse_multi(text)
    assert (got.kind if got else None) == kind, got


def test_multi_value_items_and_labels():
    assert parse_multi("(b) 3; (a) 5") == Multi("parts", ("5", "3"), ("1", "2"))
    assert parse_multi("x = \\pm 2") == Multi("set", ("+2", "-2"), pm=True)
    assert parse_multi("y = 2, x = 1") == Multi("names", ("2", "1"), ("y", "x"))
    assert parse_multi("[1, 2)") == Multi("tuple", ("1", "2"), brackets="[)")
    assert parse_multi("1, 2, 3, and 4") == Multi("list", ("1", "2", "3", "4"))


def test_fallback_sees_one_value_at_a_time(monkeypatch):
    # math_verify matches sets and tuples in any order, so it must never get two lists
    real, seen = math_verify_pool._get_pool(), []

    class Recording:
        def run(self, answer, gold, soft_s, hard_s):
            seen.append((answer, gold))
            return real.run(answer, gold, soft_s, hard_s)

    monkeypatch.setattr(math_verify_pool, "_get_pool", Recording)
    monkeypatch.setattr(math_verify_pool, "_cache", OrderedDict())
    for answer, gt, acc, family in TABLE:
        assert R.check_answer(answer, gt, timeout_s=5).correct is bool(acc), (answer, gt, family)
    assert ("\\sqrt{4}", "3") in seen and ("2\\sqrt{2}", "\\sqrt{8}") in seen
    assert all(parse_multi(gold) is None and parse_multi(answer) is None for answer, gold in seen), seen


def test_multi_value_fallback_shares_one_budget():
    slow = ", ".join(f"(x+{k})^{{100000}}" for k in range(1, 7))
    start = time.monotonic()
    res = R.check_answer(slow, "1, 2, 3, 4, 5, 6", timeout_s=1)
    assert res == R.Verdict(False, "timeout") and time.monotonic() - start < 4.0
    res = R.check_answer("\\{" + slow + "\\}", "\\{1, 2, 3, 4, 5, 6\\}", timeout_s=1)
    assert res == R.Verdict(False, "timeout")


FORMAT_CASES = [
    ("<think>t</think><answer>1</answer>", 0.0),  # missing caption
    ("Sure! <caption>c</caption><think>t</think><answer>1</answer>", 0.0),  # text before
    ("<caption>c</caption><think>t</think><answer>1</answer> Done.", 0.0),  # text after
    ("<caption>c</caption>between<think>t</think><answer>1</answer>", 0.0),  # text between tags
    ("<think>t</think><caption>c</caption><answer>1</answer>", 0.0),  # wrong order
    ("<caption>c</caption><answer>1</answer><think>t</think>", 0.0),  # wrong order
    ("<caption>c</caption><think>t</think><answer>1", 0.0),  # unclosed answer
    ("<caption>c<think>t</think><answer>1</answer>", 0.0),  # unclosed caption
    ("1", 0.0),  # no tags
    ("", 0.0),
    ("\n  <caption>c</caption>\n<think>t</think>\n<answer> 1 </answer>\n\n", 1.0),  # white space ok
    ("<caption></caption><think></think><answer>1</answer>", 1.0),  # empty parts pass the regex
]


@pytest.mark.parametrize("response,score", FORMAT_CASES)
def test_format(response, score):
    res = R.compute_score(response, "1")
    assert res.score == score
    assert res.format == (1.0 if score else 0.0)
    if not score:
        assert res.acc == 0.0 and res.reason == "format_invalid" and res.answer is None


def test_weights():
    assert R.compute_score(wrap("4"), "4", acc_weight=0.5, format_weight=0.5).score == 1.0
    assert R.compute_score(wrap("5"), "4", acc_weight=0.5, format_weight=0.3).score == 0.3
    assert R.compute_score(wrap("x" * 50), "4", max_answer_chars=50).reason == "answer_too_long"


def test_tag_soup_scores_zero():
    # The reference regex backtracks cubically here (~10 s at 400 blocks); the linear pre-check
    # in prism_rl.format rejects it first (a regression shows up as a stalled test, not a pass).
    soup = "<caption></caption><think></think><answer></answer>" * 2000 + "x"
    assert R.compute_score(soup, "1").score == 0.0


def test_rules_do_not_touch_the_pool(monkeypatch):
    used: list[tuple[str, str]] = []

    class FakePool:
        def run(self, answer, gold, soft_s, hard_s):
            used.append((answer, gold))
            return "false"

    monkeypatch.setattr(math_verify_pool, "_get_pool", FakePool)
    monkeypatch.setattr(math_verify_pool, "_cache", OrderedDict())
    fallback_rows = 0
    for answer, gt, acc, _ in TABLE:
        before = len(used)
        verdict = R.check_answer(answer, gt)
        if "math_verify" in verdict.reason:  # the (fake, always "false") fallback took part
            fallback_rows += 1
        else:
            assert len(used) == before and verdict.correct is bool(acc), (answer, gt, verdict)
    assert 0 < len(used) <= fallback_rows <= 20


def test_adversarial_answers_are_bounded():
    cases = [
        ("9^9^9^9^9", "1", "rejected:power"),
        ("2^{2^{30}}", "1", "rejected:power"),
        ("10^{999999999}", "1", "rejected:power"),
        ("{" * 200 + "1" + "}" * 200, "1", "rejected:nesting"),
        ("\\frac{" * 60 + "1" + "}{2}" * 60, "1", "rejected:nesting"),
        ("9" * 100000, "1", "answer_too_long"),
        ("9^" * 500 + "9", "1", "rejected:power"),
    ]
    for answer, gt, reason in cases:
        res = R.compute_score(wrap(answer), gt, timeout_s=1)
        assert res.score == pytest.approx(0.2) and res.acc == 0.0
        assert res.reason == reason


def test_timeout_soft_and_hard():
    res = R.compute_score(wrap("(x+1)^{100000}"), "1", timeout_s=1)
    assert (res.score, res.acc, res.reason) == (pytest.approx(0.2), 0.0, "timeout")
    # a long (~900 chars) LaTeX expression: whatever the fallback does, it is bounded
    long_expr = "+".join(f"\\frac{{x^{{{k}}}+{k}}}{{(x-{k})^{{{k}}}}}" for k in range(2, 40))[:900]
    res = R.compute_score(wrap(long_expr), "1", timeout_s=1)
    assert res.score == pytest.approx(0.2) and res.acc == 0.0
    # the hard deadline: the caller stops waiting and the worker is replaced
    assert math_verify_pool._get_pool().run("(x+1)^{100000}", "2", 30.0, 0.5) == "hard_timeout"
    assert R.check_answer("\\sqrt{18}", "3\\sqrt{2}", timeout_s=5) == R.Verdict(True, "match:math_verify")


def test_fallback_is_thread_safe():
    out: dict[int, bool] = {}

    def work(i: int) -> None:
        right = R.is_correct(f"\\sqrt{{{4 * i * i}}}", f"{2 * i}")
        out[i] = right and not R.is_correct(f"\\sqrt{{{i}}}", "0.1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {i: True for i in range(2, 10)}


def test_batch_scores():
    res = R.batch_scores([wrap("B"), "bad", wrap("\\sqrt{4}"), wrap("")], ["B", "B", "2", "1"])
    assert [r.score for r in res] == [1.0, 0.0, 1.0, 0.2]
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        R.batch_scores(["a", "b"], ["a"])


def test_batch_scores_weights_plugins_and_order(tmp_path):
    answers, gts = ["B", "C", "\\sqrt{4}", "7", "x"] * 3, ["B", "B", "2", "8", "x"] * 3
    texts = [wrap(a) for a in answers]
    res = R.batch_scores(texts, gts, acc_weight=0.5, format_weight=0.3)
    assert [r.score for r in res] == [0.8, 0.3, 0.8, 0.3, 0.8] * 3
    assert res == [R.compute_score(t, g, acc_weight=0.5, format_weight=0.3) for t, g in zip(texts, gts)]
    plugin = tmp_path / "plug.py"
    plugin.write_text("def rank(response, ground_truth, **kw):\n    return float(ground_truth)\n")
    ranks = [str(i) for i in range(len(texts))]
    for fn in (f"{plugin}:rank", R.load_reward_fn(f"{plugin}:rank")):
        for threads in (None, 4):
            got = R.batch_scores(texts, ranks, reward_fn=fn, num_threads=threads)
            assert [r.score for r in got] == [float(i) for i in range(len(texts))]


def test_fallback_worker_ignores_the_cwd(tmp_path):
    # a json.py where the user stands must not shadow the stdlib inside the math-verify worker
    (tmp_path / "json.py").write_text('raise SystemExit("shadowed")\n')
    src = os.path.dirname(os.path.dirname(prism_rl.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    code = "from prism_rl.reward import check_answer; print(check_answer('\\\\sqrt{8}', '2\\\\sqrt{2}'))"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "Verdict(correct=True, reason='match:math_verify')", out.stderr


PLUGIN = '''
from prism_rl.reward import RewardResult

def as_float(response, ground_truth, **kwargs):
    return 0.5 if ground_truth in response else -1

def as_dict(response, ground_truth, **kwargs):
    return {"score": 0.7, "acc": 1.0, "reason": "mine"}

def as_result(response, ground_truth, **kwargs):
    return RewardResult(score=0.9, acc=1.0, format=1.0, answer="x", reason="r")

def as_text(response, ground_truth, **kwargs):
    return "high"

not_a_function = 3
'''


def test_load_reward_fn(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(PLUGIN)
    fn = R.load_reward_fn(f"{path}:as_float")
    res = fn(wrap("42"), "42")
    assert (res.score, res.acc, res.format, res.answer, res.reason) == (0.5, 0.5, 1.0, "42", "custom")
    assert fn("no tags", "42").score == -1.0 and fn("no tags", "42").format == 0.0
    res = R.load_reward_fn(f"{path}:as_dict")("r", "g")
    assert (res.score, res.acc, res.reason) == (0.7, 1.0, "mine")
    assert R.load_reward_fn(f"{path}:as_result")("r", "g") == R.RewardResult(0.9, 1.0, 1.0, "x", "r")
    with pytest.raises(TypeError, match="as_text"):
        R.load_reward_fn(f"{path}:as_text")("r", "g")
    with pytest.raises(AttributeError) as err:
        R.load_reward_fn(f"{path}:missing")
    assert "my_reward.py" in str(err.value) and "'missing'" in str(err.value)
    with pytest.raises(TypeError, match="not callable"):
        R.load_reward_fn(f"{path}:not_a_function")
    with pytest.raises(FileNotFoundError) as err:
        R.load_reward_fn(f"{tmp_path}/nope.py:score")
    assert "nope.py" in str(err.value) and "'score'" in str(err.value)
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        R.load_reward_fn(str(path))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="broken.py"):
        R.load_reward_fn(f"{broken}:f")


def test_score_jsonl_round_trip(tmp_path, capsys):
    rows = [
        {"id": 1, "response": wrap("(B)"), "ground_truth": "B"},
        {"id": 2, "response": wrap("12 cm"), "ground_truth": 12},
        {"id": 3, "response": "no tags", "ground_truth": "B"},
        {"id": 4, "response": wrap("2, 3"), "ground_truth": ["2", "3"]},
        {"id": 5, "response": wrap("3, 2"), "ground_truth": ["2", "3"]},  # a JSON list is ordered
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dst = tmp_path / "out" / "scored.jsonl"
    stats = R.score_jsonl(src, dst)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2, 3, 4, 5]
    triples = [(o["score"], o["acc"], o["format"]) for o in out]
    assert triples == [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.2, 0.0, 1.0)]
    assert out[0]["response"] == rows[0]["response"]
    assert stats == pytest.approx({"n": 5, "mean_score": 0.64, "mean_acc": 0.6, "format_rate": 0.8})

    stats = R.score_jsonl(src)  # to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["score"] for p in printed] == [1.0, 1.0, 0.0, 1.0, 0.2] and stats["n"] == 5

    plugin = tmp_path / "plug.py"
    plugin.write_text("def half(response, ground_truth, **kw):\n    return 0.5\n")
    stats = R.score_jsonl(src, tmp_path / "p.jsonl", reward_fn=f"{plugin}:half")
    assert stats["mean_score"] == 0.5


def test_score_jsonl_errors(tmp_path):
    src = tmp_path / "bad.jsonl"
    good, bad = json.dumps({"response": "r", "ground_truth": "g"}), json.dumps({"response": "r"})
    src.write_text(good + "\n\n" + bad + "\n")
    dst = tmp_path / "never.jsonl"
    with pytest.raises(R.RewardInputError) as err:
        R.score_jsonl(src, dst)
    assert str(err.value) == f"{src}:3: missing field 'ground_truth'"
    assert not dst.exists()
    src.write_text("{not json}\n")
    with pytest.raises(R.RewardInputError, match=r"bad\.jsonl:1: invalid JSON"):
        R.score_jsonl(src, dst)
    src.write_text(json.dumps({"ground_truth": "g"}) + "\n")
    with pytest.raises(R.RewardInputError, match=r"bad\.jsonl:1: missing field 'response'"):
        R.score_jsonl(src, dst)


def test_score_jsonl_stdout_is_a_stream(tmp_path, monkeypatch):
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"response": wrap("1"), "ground_truth": "1"}) + "\n")
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    assert R.score_jsonl(src)["mean_acc"] == 1.0
    assert json.loads(buf.getvalue())["score"] == 1.0
