"""Control reward for RL experiments: a coin flip (p = 1/4) fixed by the response text.

It carries no information about correctness. Being a function of the text, it can still be
learned (a policy can drift to texts it pays for), so an RL run with it shows what optimising
an uninformative reward does to accuracy, an upper bound on the cost of update noise alone
(compare with the verifiable reward at the same settings):
    prism rl --algo grpo ... reward.function=bench/reward_random.py:score
"""

import hashlib


def score(response: str, ground_truth: str) -> float:
    return float(hashlib.md5(response.encode()).digest()[0] % 4 == 0)
