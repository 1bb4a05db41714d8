"""The ``\\boxed{}`` convention of verl's and EasyR1's example data (geo3k, math): a built-in reward.

Their prompts ask the model to reason inside ``<think> </think>`` and to put the final answer
in ``\\boxed{}``; the PRISM reward (``<caption>/<think>/<answer>``) gives such a response 0.
This reward scores that convention instead (``reward.function=boxed``)::

    format = 1 if the response is  <think> ... </think> ... \\boxed{...} ...  (else 0)
    acc    = 1 if the content of the LAST \\boxed{...} matches the ground truth (else 0)
    score  = acc_weight * acc + format_weight * format

as verl's geo3k reward does (accuracy counts whether or not the format holds; verl weighs
them 0.9/0.1, this reward takes ``reward.acc_weight``/``reward.format_weight``, 0.8/0.2 by
default). Answers are compared with the same rules as the PRISM reward
(:func:`prism_rl.reward.matching.check_answer`).
"""

from __future__ import annotations

from prism_rl.reward.matching import DEFAULT_TIMEOUT_S, MAX_ANSWER_CHARS, check_answer
from prism_rl.reward.scoring import ACC_WEIGHT, FORMAT_WEIGHT, RewardResult

__all__ = ["boxed_format_ok", "boxed_score", "last_boxed"]

_BOX_COMMANDS = ("\\boxed{", "\\fbox{")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` that closes the group opened just before ``start``; ``None`` if the
    text ends first. Depth counting: ``{`` +1, ``}`` -1; a backslash escapes the next character
    (``\\{`` and ``\\}`` are literal braces in LaTeX). One pass, linear time."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, stripped.

    ``None`` when there is none, or when the last one is never closed (a truncated response):
    the answer is what the last box holds, so an earlier box does not stand in for it.
    """
    starts = [(text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS]
    pos, cmd = max(starts)
    if pos < 0:
        return None
    begin = pos + len(cmd)
    end = _closing_brace(text, begin)
    return None if end is None else text[begin:end].strip()


def boxed_format_ok(text: str) -> bool:
    """``True`` when the response is ``<think> ... </think> ... \\boxed{ ... } ...``.

    The same strings as verl geo3k's ``re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*",
    DOTALL)``, except that leading white space is allowed; checked in linear time (taking the
    earliest ``</think>``, then the earliest ``\\boxed{`` after it, then any ``}`` after that is
    optimal: a later choice only removes options).
    """
    body = text.lstrip()
    if not body.startswith("<think>"):
        return False
    end_think = body.find("</think>", len("<think>"))
    if end_think < 0:
        return False
    box = body.find("\\boxed{", end_think + len("</think>"))
    return box >= 0 and body.find("}", box + len("\\boxed{")) >= 0


def boxed_score(
    response: str,
    ground_truth: str,
    *,
    acc_weight: float = ACC_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardResult:
    """Reward of one rollout under the ``\\boxed{}`` convention (formula in the module docstring).

    ``answer`` is the last box's content (``None`` without one; reason ``"no_boxed"``); an
    empty box or one of ``>= max_answer_chars`` characters scores accuracy 0.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    fmt = 1.0 if boxed_format_ok(response) else 0.0
    answer = last_boxed(response)
    if answer is None:
        acc, reason = 0.0, "no_boxed"
    elif not answer:
        acc, reason = 0.0, "empty_answer"
    elif len(answer) >= max_answer_chars:
        acc, reason = 0.0, "answer_too_long"
    else:
        verdict = check_answer(answer, ground_truth, timeout_s=timeout_s, max_answer_chars=max_answer_chars)
        acc, reason = (1.0 if verdict.correct else 0.0), verdict.reason
    return RewardResult(acc_weight * acc + format_weight * fmt, acc, fmt, answer, reason)
