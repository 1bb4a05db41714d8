"""Batch scoring: :func:`batch_scores`, the one batch path, and the ``prism reward`` JSONL CLI.

With the built-in reward, items are scored on a thread pool so that math-verify fallbacks
run in parallel on the worker pool; :func:`score_jsonl` scores a file through
:func:`batch_scores`, so training and the CLI share one path.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from prism_rl.reward.builtins import is_builtin
from prism_rl.reward.math_verify_pool import MAX_MATH_VERIFY_WORKERS
from prism_rl.reward.plugins import RewardFn, _call, _resolve
from prism_rl.reward.scoring import RewardResult

__all__ = ["RewardInputError", "batch_scores", "score_jsonl"]


class RewardInputError(ValueError):
    """Bad reward input; the message names the file, the line number and the field."""


def batch_scores(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    reward_fn: RewardFn | str | None = None,
    num_threads: int | None = None,
    **kwargs: Any,
) -> list[RewardResult]:
    """Score a batch (results in input order); ``kwargs`` go to the reward function.

    With a built-in reward, items run on up to ``MAX_MATH_VERIFY_WORKERS`` threads so that
    fallback calls use the worker pool in parallel; a plug-in runs sequentially unless
    ``num_threads`` is given.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    fn = _resolve(reward_fn)
    if num_threads is None:
        num_threads = MAX_MATH_VERIFY_WORKERS if is_builtin(fn) else 1
    pairs = list(zip(responses, ground_truths))
    if num_threads <= 1 or len(pairs) <= 1:
        return [_call(fn, r, g, kwargs) for r, g in pairs]
    with ThreadPoolExecutor(max_workers=min(num_threads, len(pairs))) as ex:
        return list(ex.map(lambda p: _call(fn, p[0], p[1], kwargs), pairs))


def _ground_truth_text(value: Any) -> str | None:
    """A JSON ground truth as text: strings as is, numbers via ``str``, lists joined by ``", "``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    return None


def _parse_line(path: Path, lineno: int, line: str) -> tuple[dict[str, Any], str]:
    """Validate one JSONL line: ``(record, ground truth as text)``; errors name file and line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RewardInputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(rec, dict):
        raise RewardInputError(f"{path}:{lineno}: expected a JSON object")
    for field in ("response", "ground_truth"):
        if field not in rec or rec[field] is None:
            raise RewardInputError(f"{path}:{lineno}: missing field {field!r}")
    if not isinstance(rec["response"], str):
        raise RewardInputError(f"{path}:{lineno}: field 'response' must be a string")
    gt = _ground_truth_text(rec["ground_truth"])
    if gt is None:
        raise RewardInputError(f"{path}:{lineno}: field 'ground_truth' must be a string or number")
    return rec, gt


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any], str, str]]:
    """Read and validate every line: ``(line number, record, response, ground truth)``."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            rec, gt = _parse_line(path, lineno, line)
            rows.append((lineno, rec, rec["response"], gt))
    return rows


def _write_lines(fh: TextIO, lines: list[str]) -> None:
    """Write ``lines`` and flush."""
    fh.writelines(lines)
    fh.flush()


def _write_output(output_path: str | os.PathLike[str] | None, lines: list[str]) -> None:
    """Write ``lines`` to ``output_path`` (parents created) or to stdout when it is ``None``."""
    if output_path is None:
        _write_lines(sys.stdout, lines)
        return
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        _write_lines(fh, lines)


def _summary(results: list[RewardResult]) -> dict[str, float]:
    """``{"n", "mean_score", "mean_acc", "format_rate"}`` of ``results`` (means 0 when empty)."""
    n = len(results)

    def mean(values: Iterable[float]) -> float:
        """Mean over the ``n`` results (0 for an empty file)."""
        return sum(values) / n if n else 0.0

    return {
        "n": n,
        "mean_score": mean(r.score for r in results),
        "mean_acc": mean(r.acc for r in results),
        "format_rate": mean(r.format for r in results),
    }


def score_jsonl(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    reward_fn: RewardFn | str | None = None,
) -> dict[str, float]:
    """Score a JSONL file of ``{"response", "ground_truth", ...}`` lines.

    Every line is written back with ``score``, ``acc`` and ``format`` added, to
    ``output_path`` or to stdout when it is ``None``. All lines are read and validated
    before anything is written, so a bad line (named by file, line number and field) leaves
    no partial output. Blank lines are skipped. ``reward_fn`` may be a callable or a
    ``"file.py:function"`` spec. Returns ``{"n", "mean_score", "mean_acc", "format_rate"}``.
    """
    rows = _read_jsonl(Path(input_path))
    fn = _resolve(reward_fn)
    results = batch_scores([r[2] for r in rows], [r[3] for r in rows], reward_fn=fn)
    out_lines = [
        json.dumps(dict(rec, score=res.score, acc=res.acc, format=res.format), ensure_ascii=False) + "\n"
        for (_, rec, _, _), res in zip(rows, results)
    ]
    _write_output(output_path, out_lines)
    return _summary(results)
