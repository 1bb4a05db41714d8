"""Sanity reward for checking that RL optimises what it is given: 1 when the <answer> is "7".

    prism rl --algo grpo ... reward.function=bench/reward_seven.py:score
A correct RL loop must raise the share of "7" answers within a few dozen steps.
"""

from prism_rl.format import extract_answer


def score(response: str, ground_truth: str) -> float:
    return 1.0 if (extract_answer(response) or "") == "7" else 0.0
