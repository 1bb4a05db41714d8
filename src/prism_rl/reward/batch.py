"""Batch scoring: :func:`batch_scores`, the one batch path, and the ``prism reward`` JSONL CLI.

With the built-in reward, items are scored on a thread pool so that math-verify fallbacks
run in parallel on the worker pool; :func:`score_jsonl` scores a file through
:func:`batch_scores`, so training and the CLI share one path.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
    except (json.JSONDecodeError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise RewardInputError(f"{path}:{lineno}: invalid JSON ({why})") from None
    if not isinstance(rec, dict):
        raise RewardInputError(f"{path}:{lineno}: expected a JSON object")
    _check_unicode(path, lineno, rec)
    for field in ("response", "ground_truth"):
        if field not in rec or rec[field] is None:
            raise RewardInputError(f"{path}:{lineno}: missing field {field!r}")
    if not isinstance(rec["response"], str):
        raise RewardInputError(f"{path}:{lineno}: field 'response' must be a string")
    gt = _ground_truth_text(rec["ground_truth"])
    if gt is None:
        raise RewardInputError(f"{path}:{lineno}: field 'ground_truth' must be a string or number")
    return rec, gt


def _check_unicode(path: Path, lineno: int, rec: dict[str, Any]) -> None:
    """A ``\\ud800``-style escape of half a surrogate pair parses into a string that no UTF-8
    file can hold; refuse it here, naming the line and the field, not mid-way through writing."""
    for key, value in rec.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RewardInputError(f"{path}:{lineno}: field {key!r} holds a lone surrogate escape (such as "
                                   "\\ud800), which is not valid Unicode") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 JSONL file; a folder, or bytes that are not UTF-8
    text (a parquet file, say), raise ``RewardInputError`` naming the file and line."""
    if path.is_dir():
        raise RewardInputError(f"{path}: is a folder, not a JSONL file")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise RewardInputError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start}: "
                                       f"{raw[exc.start:exc.start + 1]!r}); expected JSONL, one JSON object "
                                       "per line") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any], str, str]]:
    """Read and validate every line: ``(line number, record, response, ground truth)``; a file
    with no record is an error (scoring nothing is almost always the wrong file)."""
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        rec, gt = _parse_line(path, lineno, line)
        rows.append((lineno, rec, rec["response"], gt))
    if not rows:
        raise RewardInputError(f"{path}: no records to score (the file is empty)")
    return rows


def _write_output(output_path: str | os.PathLike[str] | None, lines: list[str]) -> None:
    """Write ``lines`` to stdout when ``output_path`` is ``None``, else to a temporary file
    beside ``output_path`` (parents created) that then replaces it: the output is whole or
    absent, never half-written."""
    if output_path is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    out = Path(output_path)
    if out.is_dir():
        raise RewardInputError(f"--output {out}: is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    ``output_path`` (atomically) or to stdout when it is ``None``. All lines are read and
    validated before anything is written, so a bad line (named by file, line number and
    field: bad JSON, bytes that are not UTF-8, a lone surrogate escape) leaves no partial
    output. Blank lines are skipped; a file without records is an error. ``reward_fn`` may be a callable or a
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
