"""The one generate-and-score loop, shared by held-out eval, benchmark eval and the difficulty
filter.

:func:`generate_and_score` sends prompts to a rollout engine in batches, hands every sampled
response to a scoring callback, and returns what the callback made of them in row order
(prompt by prompt, ``params.n`` samples each), with one progress bar. An optional per-batch
``sink`` sees each batch's rows as soon as they are scored: benchmark eval appends them to
``samples.jsonl`` there, so an interrupted run keeps every finished batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

__all__ = ["Score", "generate_and_score"]

# (record, response text, response tokens, finish reason) -> one scored row
Score = Callable[[Any, str, int, str], Any]


def generate_and_score(engine, prompts: Sequence, params, batch_size: int, score: Score, *,
                       sink: Callable[[list], None] | None = None,
                       encode: Callable[[Sequence], list] | None = None,
                       desc: str = "eval", done: int = 0) -> list:
    """Generate ``params.n`` responses per prompt, ``batch_size`` prompts at a time, and score
    each; returns the scored rows.

    ``prompts`` are encoded prompts, or items that ``encode`` turns into encoded prompts one
    batch at a time (benchmark eval encodes per batch so that only one batch's pixels are in
    memory; ``encode`` may drop bad records, and a batch left empty is not generated).
    ``done`` counts items finished earlier (a resumed run) for the progress bar.
    """
    rows: list = []
    bar = tqdm(total=len(prompts) + done, initial=done, desc=desc, dynamic_ncols=True)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            batch = _score_batch(engine, encode(chunk) if encode else chunk, params, start, score)
            if batch and sink is not None:
                sink(batch)
            rows += batch
            bar.update(len(chunk))
    finally:
        bar.close()
    return rows


def _score_batch(engine, encoded: list, params, offset: int, score: Score) -> list:
    """One ``generate`` call on ``encoded`` and its rows, scored."""
    if not encoded:
        return []
    ro = engine.generate(encoded, params, group_offset=offset)
    lengths = ro.response_lengths.tolist()
    return [score(ro.records[i], ro.texts[i], int(lengths[i]), ro.finish_reasons[i])
            for i in range(len(ro))]
