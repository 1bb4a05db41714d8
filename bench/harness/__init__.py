"""The GPU benchmark harness behind ``bench/run.py``: our code beside its peer, same process, same card.

Modules: ``shapes`` (model shapes, workloads, random-init models behind a real processor),
``data`` (448 px synthetic problems as prompts, TRL rows, synthetic rollouts), ``measure``
(timers, peak memory, the card's copy bandwidth and matmul peak), ``bounds`` (FLOP and byte
counts: MFU and the rollout bound), ``rollout`` / ``train`` / ``rlstep`` (the suites) and
``report`` (JSON, the table, the docs section).
"""
