"""The built-in rewards by name, and the response format each one scores.

``reward.function`` (``prism rl``), ``--reward`` (``prism data filter-difficulty``) and
``--reward-fn`` (``prism reward``) take one of these names or ``path/to/file.py:function``:

==========  =====================================================  ===========================
name        scores                                                 function
==========  =====================================================  ===========================
``prism``   ``<caption>/<think>/<answer>`` (the default; also "")   :func:`~.scoring.compute_score`
``boxed``   ``<think>...</think>`` then ``\\boxed{answer}``           :func:`~.boxed.boxed_score`
==========  =====================================================  ===========================

Both take ``acc_weight`` and ``format_weight`` (``reward.acc_weight``/``format_weight``).
Each names its convention (a key of :data:`prism_rl.data.prompt_format.CONVENTIONS`), so a
stage can check that its prompts ask for the format its reward scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prism_rl.reward.boxed import boxed_score
from prism_rl.reward.scoring import compute_score

__all__ = ["BUILTIN_REWARDS", "BuiltinReward", "builtin_reward", "is_builtin"]


@dataclass(frozen=True)
class BuiltinReward:
    """A built-in reward: its name, its scoring function and the convention it scores."""

    name: str
    fn: Callable[..., object]
    convention: str

    @property
    def label(self) -> str:
        """How messages name it: ``built-in 'boxed'``."""
        return f"built-in '{self.name}'"


BUILTIN_REWARDS = {r.name: r for r in (BuiltinReward("prism", compute_score, "prism"),
                                        BuiltinReward("boxed", boxed_score, "boxed"))}


def builtin_reward(spec: str | None) -> BuiltinReward | None:
    """The built-in named by ``spec`` (``""``/``None`` is ``prism``); ``None`` for a file spec."""
    return BUILTIN_REWARDS["prism"] if not spec else BUILTIN_REWARDS.get(spec)


def is_builtin(fn: object) -> bool:
    """True for the scoring function of a built-in (it takes the reward weights as keywords)."""
    return any(fn is r.fn for r in BUILTIN_REWARDS.values())
