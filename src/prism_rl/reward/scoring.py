"""The score policy: :class:`RewardResult` and :func:`compute_score` for one rollout.

``format-invalid -> 0``; ``valid with an empty answer or one of >= MAX_ANSWER_CHARS
characters -> FORMAT_WEIGHT``; otherwise ``ACC_WEIGHT * acc + FORMAT_WEIGHT``, with ``acc``
from :func:`prism_rl.reward.matching.check_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prism_rl.format import parse_response
from prism_rl.reward.matching import DEFAULT_TIMEOUT_S, MAX_ANSWER_CHARS, check_answer

__all__ = ["ACC_WEIGHT", "FORMAT_WEIGHT", "RewardResult", "compute_score"]

ACC_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2


@dataclass(frozen=True)
class RewardResult:
    """One scored rollout: ``score = acc_weight * acc + format_weight * format`` (see module)."""

    score: float
    acc: float
    format: float
    answer: str | None
    reason: str


def compute_score(
    response: str,
    ground_truth: str,
    *,
    acc_weight: float = ACC_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardResult:
    """Reward of one rollout.

    Rules: format-invalid -> score 0 (acc 0, format 0); valid with an empty answer or one of
    ``>= max_answer_chars`` characters -> ``format_weight``; else
    ``acc_weight * acc + format_weight``. For an invalid response ``answer`` is ``None``.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    # parse_response runs the linear-time format_matches before the reference regex, so tag
    # soup cannot make the regex backtrack.
    parsed = parse_response(response)
    if parsed is None:
        return RewardResult(0.0, 0.0, 0.0, None, "format_invalid")
    answer = parsed.answer
    if not answer:
        return RewardResult(float(format_weight), 0.0, 1.0, answer, "empty_answer")
    if len(answer) >= max_answer_chars:
        return RewardResult(float(format_weight), 0.0, 1.0, answer, "answer_too_long")
    verdict = check_answer(answer, ground_truth, timeout_s=timeout_s, max_answer_chars=max_answer_chars)
    acc = 1.0 if verdict.correct else 0.0
    return RewardResult(acc_weight * acc + format_weight * 1.0, acc, 1.0, answer, verdict.reason)

