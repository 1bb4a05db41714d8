"""A plug-in reward for the distributed RL tests: the tiny model never earns the built-in
PRISM reward, so every group would have zero advantage and nothing would train. This one is
a fixed function of the text (the share of its characters whose code is divisible by 3), so
samples of one prompt differ in reward and GRPO has something to learn from."""


def reward(response: str, ground_truth: str, **kwargs) -> float:
    return sum(ord(c) % 3 == 0 for c in response) / max(len(response), 1)
