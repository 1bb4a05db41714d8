"""A plug-in reward for the distributed RL tests: the tiny model never earns the built-in
PRISM reward, so every group would have zero advantage and nothing would train. This one is
a fixed function of the text (half: the share of its characters whose code is divisible by
3, so samples of one prompt differ and GRPO has something to learn from) and of the ground
truth (half: the parity of its character codes' sum, so greedy eval, whose tiny-model
responses all look alike, still scores prompts differently and a rank's share differs from
the whole)."""


def reward(response: str, ground_truth: str, **kwargs) -> float:
    text = sum(ord(c) % 3 == 0 for c in response) / max(len(response), 1)
    return 0.5 * text + 0.5 * (sum(map(ord, ground_truth)) % 2)


def dapo_reward(response: str, ground_truth: str, **kwargs) -> dict:
    """:func:`reward` as the score, and a right/wrong accuracy (the text half at least 0.3), so
    some groups are all wrong and DAPO's dynamic sampling drops them."""
    text = sum(ord(c) % 3 == 0 for c in response) / max(len(response), 1)
    return {"score": reward(response, ground_truth), "acc": float(text >= 0.3)}
