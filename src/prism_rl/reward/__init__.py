"""The verifiable reward of PRISM's RLVR stage (METHOD.md section 7).

Score of one rollout::

    format-invalid (whole-text regex of ``prism_rl.format``)    -> 0.0
    valid, empty <answer> or an answer of >= 1024 characters      -> format_weight (0.2)
    otherwise                                                     -> 0.8 * acc + 0.2 * 1

Accuracy (0 or 1) is rule-based on the ``<answer>`` content. The rules run in this order and
the first one that can decide does:

1. multiple-choice letters (``B``, ``(B)``, ``b``, ``\\text{B}``, ``The answer is B``,
   ``Answer: (B) 30``, ``C because ...``; ``C and D`` or ``A triangle ...`` are no letter);
2. exact match after light normalisation (wrappers, white space, case, final period);
3. numbers within relative error 1e-6 (thousands separators, unicode minus, currency,
   trailing units and percent handled);
4. normalised text and LaTeX (``\\frac``, ``\\text``, ``^\\circ``, delimiters, ``\\boxed`` ...);
5. multi-value answers, item by item: in order (lists ``3, 4``, points ``(3, 4)``), by label
   (parts ``(1) 5 (2) 3``, names ``x = 1, y = 2``), or in any order only when the ground
   truth is a set (``\\{3, 4\\}``, ``3 or 4``, ``x = 3, x = 4``, ``\\pm 2``); each pair of
   items goes through rules 2-7, so the fallback never sees a whole list;
6. two different plain-word answers (``yes`` vs ``no``) are wrong;
7. ``math_verify`` (symbolic equivalence) as the fallback.

Every check is bounded in time. Rules 1-6 are string work on an answer capped at
``max_answer_chars`` (at most ``MAX_ITEMS`` = 64 items a list). The fallback never runs in the
calling process: it runs in a small, lazily started pool of reusable worker processes
(``python -P math_verify_worker.py`` children that import only ``math_verify``), each call
under a soft deadline (``setitimer`` inside the worker, whose main thread owns the signal)
and a hard one (the caller stops waiting and kills the worker; a fresh one is started in
the background). So it is safe from any thread, and a pathological answer costs at most
``timeout_s`` (+ a 1 s grace) and scores accuracy 0 with ``reason="timeout"``; the calls
for the items of one multi-value answer share that budget once the first has returned (at
most about ``2 * timeout_s`` in all). Answers that rules settle never touch the pool.

Modules, one layer each (each imports only the ones above it):

- :mod:`~prism_rl.reward.math_verify_pool` -- the worker pool behind the fallback
  (worker script: :mod:`~prism_rl.reward.math_verify_worker`);
- :mod:`~prism_rl.reward.normalize` -- text and LaTeX normalisation;
- :mod:`~prism_rl.reward.multivalue` -- multi-value answers: which kind, how compared;
- :mod:`~prism_rl.reward.matching` -- the rules: :func:`check_answer`, :func:`is_correct`;
- :mod:`~prism_rl.reward.scoring` -- the score policy: :class:`RewardResult`,
  :func:`compute_score`;
- :mod:`~prism_rl.reward.boxed` -- the ``\\boxed{}`` convention of verl's example data:
  :func:`boxed_score`;
- :mod:`~prism_rl.reward.builtins` -- the built-in rewards by name (``prism``, ``boxed``) and
  the response format each scores;
- :mod:`~prism_rl.reward.plugins` -- user reward functions: :func:`load_reward_fn`;
- :mod:`~prism_rl.reward.batch` -- :func:`batch_scores` and the JSONL CLI :func:`score_jsonl`.
"""

from prism_rl.reward.batch import RewardInputError, batch_scores, score_jsonl
from prism_rl.reward.boxed import boxed_score
from prism_rl.reward.matching import DEFAULT_TIMEOUT_S, MAX_ANSWER_CHARS, Verdict, check_answer, is_correct
from prism_rl.reward.math_verify_pool import close_math_verify_workers
from prism_rl.reward.plugins import load_reward_fn
from prism_rl.reward.scoring import RewardResult, compute_score

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "RewardInputError",
    "RewardResult",
    "Verdict",
    "batch_scores",
    "boxed_score",
    "check_answer",
    "close_math_verify_workers",
    "compute_score",
    "is_correct",
    "load_reward_fn",
    "score_jsonl",
]
