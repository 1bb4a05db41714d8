"""User reward functions: :func:`load_reward_fn` and coercion of their results.

A plug-in is named ``"path/to/file.py:function"`` (a bare name such as ``boxed`` is a built-in
reward, :mod:`prism_rl.reward.builtins`), is called like
:func:`prism_rl.reward.scoring.compute_score` (``response, ground_truth, **kwargs``) and
may return a float, a :class:`~prism_rl.reward.scoring.RewardResult` or a dict with a
``"score"`` key; whatever it returns is coerced to a ``RewardResult``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism_rl.config import ConfigError
from prism_rl.format import extract_answer, is_format_valid
from prism_rl.reward.builtins import BUILTIN_REWARDS, builtin_reward
from prism_rl.reward.scoring import RewardResult, compute_score

__all__ = ["RewardFn", "load_reward_fn", "load_reward_option"]

RewardFn = Callable[..., RewardResult]


def _as_result(value: Any, response: str, origin: str) -> RewardResult:
    """Coerce a plug-in's return value to a :class:`RewardResult`.

    A ``RewardResult`` passes through. A number (or a dict with ``"score"``) becomes the score;
    ``acc`` defaults to the score (so accuracy-based filters see the plug-in's reward),
    ``format`` to the reference format check, ``answer`` to the extracted answer and
    ``reason`` to ``"custom"``.
    """
    if isinstance(value, RewardResult):
        return value
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward function {origin} returned a dict without a 'score' key")
        extra, value = value, value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"reward function {origin} returned {type(value).__name__}, expected a float")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward function {origin} returned a non-finite score {score}")
    fmt = extra.get("format")
    return RewardResult(
        score=score,
        acc=float(extra.get("acc", score)),
        format=float(fmt) if fmt is not None else (1.0 if is_format_valid(response) else 0.0),
        answer=extra.get("answer", extract_answer(response) if len(response) < 100_000 else None),
        reason=str(extra.get("reason", "custom")),
    )


def _import_file(path: Path, name: str) -> Any:
    """Run the reward function file ``path`` as a fresh module (``name`` is for messages)."""
    mod_name = f"prism_rl_user_reward_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"cannot load reward function file {str(path)!r} (wanted function {name!r})")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise ImportError(f"error while running reward function file {str(path)!r}: {exc!r}") from exc
    return module


def _user_function(spec: str) -> tuple[Callable[..., Any], str, str]:
    """``(callable, its name, its origin for messages)`` for ``"path/to/file.py:function"``."""
    path_str, sep, name = str(spec).rpartition(":")
    if not sep or not path_str or not name.isidentifier():
        raise ValueError(f"reward function spec {spec!r} must look like 'path/to/file.py:function' "
                         f"or name a built-in reward ({', '.join(BUILTIN_REWARDS)})")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward function file {str(path)!r} not found (wanted function {name!r})")
    fn = getattr(_import_file(path, name), name, None)
    if fn is None:
        raise AttributeError(f"reward function file {str(path)!r} has no function {name!r}")
    if not callable(fn):
        raise TypeError(f"{name!r} in reward function file {str(path)!r} is not callable")
    return fn, name, f"{name!r} from {str(path)!r}"


def load_reward_fn(spec: str) -> RewardFn:
    """Load ``"path/to/file.py:function"`` and wrap it to always return a :class:`RewardResult`;
    a built-in's name (``prism``, ``boxed``) gives that built-in's scoring function.

    The function is called like :func:`compute_score` (``response, ground_truth, **kwargs``)
    and may return a float, a ``RewardResult`` or a dict with a ``"score"`` key. Errors name
    the file and the function: ``ValueError`` for a malformed spec, ``FileNotFoundError``,
    ``ImportError`` when the file fails to run, ``AttributeError``/``TypeError`` for a missing
    or non-callable function.
    """
    builtin = BUILTIN_REWARDS.get(spec)
    if builtin is not None:
        return builtin.fn
    fn, name, origin = _user_function(spec)

    def reward_fn(response: str, ground_truth: str, **kwargs: Any) -> RewardResult:
        """Call the user's function and coerce its result."""
        return _as_result(fn(response, ground_truth, **kwargs), response, origin)

    reward_fn.__name__ = name
    reward_fn.__doc__ = f"User reward {origin}, wrapped to return a RewardResult."
    return reward_fn


def load_reward_option(spec: str, option: str) -> RewardFn | None:
    """The reward a command-line option or config key names: ``None`` for the default
    (``""`` or ``prism``: the caller's built-in path), else :func:`load_reward_fn`'s result.
    Whatever keeps it from loading is a :class:`ConfigError` naming ``option``."""
    builtin = builtin_reward(spec)
    if builtin is not None and builtin.fn is compute_score:
        return None
    try:
        return load_reward_fn(spec)
    except (ValueError, OSError, ImportError, AttributeError, TypeError) as e:
        raise ConfigError(f"{option}={spec}: {e}") from None


def _resolve(reward_fn: RewardFn | str | None) -> RewardFn:
    """``None`` -> :func:`compute_score`; a ``"file.py:fn"`` string -> :func:`load_reward_fn`."""
    if reward_fn is None:
        return compute_score
    if isinstance(reward_fn, str):
        return load_reward_fn(reward_fn)
    return reward_fn


def _call(fn: RewardFn, response: str, ground_truth: str, kwargs: dict[str, Any]) -> RewardResult:
    """Call a reward function and coerce its output."""
    out = fn(response, ground_truth, **kwargs)
    return out if isinstance(out, RewardResult) else _as_result(out, response, repr(fn))

