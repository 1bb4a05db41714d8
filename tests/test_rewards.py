"""Tests for ``prism_rl.reward``: the rule table, format failures, bounded time, plug-ins, JSONL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict

import pytest

import prism_rl
from prism_rl import reward as R
from prism_rl.format import make_response
from prism_rl.reward import math_verify_pool

CAPTION = "- a diagram with labelled points"
THINK = "Step 1: read the figure. Step 2: compute."


def wrap(answer: str) -> str:
    """A format-valid response around ``answer``."""
    return make_response(CAPTION, THINK, answer)


# (answer, ground truth, expected acc, expected score); every answer is wrapped in a valid response.
TABLE = [
    # multiple-choice letters
    ("B", "B", 1, 1.0),
    ("(B)", "B", 1, 1.0),
    ("B.", "B", 1, 1.0),
    ("B)", "B", 1, 1.0),
    ("The answer is B", "B", 1, 1.0),
    ("Answer: (B) 30", "B", 1, 1.0),
    ("The answer is (D).", "D", 1, 1.0),
    ("(b)", "B", 1, 1.0),
    ("C", "B", 0, 0.2),
    ("(B) 30", "(A) 30", 0, 0.2),
    ("30", "(A) 30", 1, 1.0),
    ("A", "(A) 30", 1, 1.0),
    ("12 cm", "C. 12 cm", 1, 1.0),
    ("12", "C. 12 cm", 1, 1.0),
    ("C", "C. 12 cm", 1, 1.0),
    ("13 cm", "C. 12 cm", 0, 0.2),
    ("30", "B", 0, 0.2),
    # exact match after normalisation
    ("Paris", "paris", 1, 1.0),
    ("Yes.", "yes", 1, 1.0),
    ("yes", "no", 0, 0.2),
    ("x = 2", "2", 1, 1.0),
    ("  7  ", "7", 1, 1.0),
    # numbers
    ("1,234", "1234", 1, 1.0),
    ("1234", "1,234", 1, 1.0),
    ("1,234,567.5", "1234567.5", 1, 1.0),
    ("\u22123", "-3", 1, 1.0),
    ("12 cm", "12", 1, 1.0),
    ("45°", "45", 1, 1.0),
    ("$3", "3", 1, 1.0),
    ("50%", "50", 1, 1.0),
    ("50\\%", "0.5", 1, 1.0),
    ("0.5", "50", 0, 0.2),
    ("3.0000001", "3", 1, 1.0),
    ("3.0001", "3", 0, 0.2),
    ("1e3", "1000", 1, 1.0),
    ("2.5 m/s", "2.5", 1, 1.0),
    ("24 square units", "24", 1, 1.0),
    ("0.000001", "0", 0, 0.2),
    ("2,3", "23", 0, 0.2),
    # normalised text and LaTeX
    ("\\frac{1}{2}", "1/2", 1, 1.0),
    ("\\dfrac{3}{4}", "0.75", 1, 1.0),
    ("\\tfrac{x+1}{2}", "(x+1)/2", 1, 1.0),
    ("\\text{Yes}", "yes", 1, 1.0),
    ("30^\\circ", "30", 1, 1.0),
    ("30^{\\circ}", "30°", 1, 1.0),
    ("$\\boxed{7}$", "7", 1, 1.0),
    ("\\(x^{2}\\)", "x^2", 1, 1.0),
    ("\\[ 5 \\]", "5", 1, 1.0),
    ("12\\,\\mathrm{cm}", "12", 1, 1.0),
    ("\\left( 1, 2 \\right)", "(1,2)", 1, 1.0),
    ("\\frac{\\pi}{2}", "\\pi/2", 1, 1.0),
    # multi-value answers (unordered)
    ("2, 3", "3, 2", 1, 1.0),
    ("3, 2", "2,3", 1, 1.0),
    ("2; 3", "3, 2", 1, 1.0),
    ("\\{1, 2, 3\\}", "3, 2, 1", 1, 1.0),
    ("x=1, y=2", "y=2, x=1", 1, 1.0),
    ("2, 4", "3, 2", 0, 0.2),
    ("2", "2, 3", 0, 0.2),
    # coordinate tuples (ordered, numeric tolerance)
    ("(1, 2)", "(1,2)", 1, 1.0),
    ("(2, 1)", "(1, 2)", 0, 0.2),
    ("(0.5, 2)", "(\\frac{1}{2}, 2)", 1, 1.0),
    ("1, 2", "(1, 2)", 1, 1.0),
    ("(1, 2.0000000001)", "(1, 2)", 1, 1.0),
    ("(1, 2, 3)", "(1, 2)", 0, 0.2),
    # math_verify fallback
    ("\\sqrt{8}", "2\\sqrt{2}", 1, 1.0),
    ("(x+1)^2", "x^2+2x+1", 1, 1.0),
    ("3\\times 10^{5}", "300000", 1, 1.0),
    ("2^{10}", "1024", 1, 1.0),
    ("\\sqrt{2}", "1.5", 0, 0.2),
    ("[1, 2]", "(1, 2)", 0, 0.2),
    # empty and overlong answers
    ("", "1", 0, 0.2),
    ("1" * 1024, "1" * 1024, 0, 0.2),
    ("1" * 1023, "1" * 1023, 1, 1.0),
]


TABLE_IDS = [f"{i}:{c[0][:20]}|{c[1][:12]}" for i, c in enumerate(TABLE)]


@pytest.mark.parametrize("answer,ground_truth,acc,score", TABLE, ids=TABLE_IDS)
def test_table(answer, ground_truth, acc, score):
    res = R.compute_score(wrap(answer), ground_truth, timeout_s=5)
    assert res.acc == acc, res
    assert res.format == 1.0
    assert res.score == pytest.approx(score)
    assert R.is_correct(answer, ground_truth, timeout_s=5) is bool(acc)


def test_table_size_and_reasons():
    assert len(TABLE) >= 60
    assert R.compute_score(wrap(""), "1").reason == "empty_answer"
    assert R.compute_score(wrap("1" * 1024), "1").reason == "answer_too_long"
    assert R.check_answer("(B)", "B").reason == "match:choice"
    assert R.check_answer("1,234", "1234").reason == "match:number"
    assert R.check_answer("\\sqrt{8}", "2\\sqrt{2}").reason == "match:math_verify"


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
    for answer, gt, acc, _ in TABLE:
        before = len(used)
        verdict = R.check_answer(answer, gt)
        if verdict.reason != "mismatch:math_verify":
            assert len(used) == before and verdict.correct is bool(acc), (answer, gt, verdict)
    assert 0 < len(used) <= 8


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
        {"id": 4, "response": wrap("3, 2"), "ground_truth": ["2", "3"]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dst = tmp_path / "out" / "scored.jsonl"
    stats = R.score_jsonl(src, dst)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2, 3, 4]
    triples = [(o["score"], o["acc"], o["format"]) for o in out]
    assert triples == [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
    assert out[0]["response"] == rows[0]["response"]
    assert stats == {"n": 4, "mean_score": 0.75, "mean_acc": 0.75, "format_rate": 0.75}

    stats = R.score_jsonl(src)  # to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["score"] for p in printed] == [1.0, 1.0, 0.0, 1.0] and stats["n"] == 4

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
