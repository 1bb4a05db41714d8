"""The prompts an RL-style stage (RLVR, alignment) trains on, and the order it draws them in.

:func:`prompt_pool` reads the training file into a lazily encoded pool (every image header
checked now, each prompt encoded when drawn); :class:`PromptStream` draws from it in a seeded,
per-epoch shuffled order whose ``(epoch, pos)`` state a checkpoint stores, so a resumed run
draws exactly the prompts the uninterrupted run would have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .processing import Encoded, LazyPrompts, read_limited, skip_or_raise
from .records import BadRecords, DataError, Record

log = logging.getLogger(__name__)


class PromptStream:
    """Prompts in a seeded per-epoch shuffled order; ``(epoch, pos)`` is its resumable state.

    ``prompts`` is a list of encoded prompts or a ``LazyPrompts`` pool, which encodes a prompt
    when it is drawn. A draw that raises ``DataError`` stops the run, unless ``bad`` is given:
    then the record is counted there once, logged, never drawn again, and the next one is taken.
    """

    def __init__(self, prompts: Sequence[Encoded], seed: int, bad: BadRecords | None = None):
        self.prompts, self.seed, self.epoch, self.pos, self.bad = prompts, seed, 0, 0, bad
        self._skip: set[int] = set()
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def take(self, k: int) -> list[Encoded]:
        out: list[Encoded] = []
        while len(out) < k:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            i = self._order[self.pos]
            self.pos += 1
            if i not in self._skip:
                out.extend(self._draw(i))
        return out

    def _draw(self, i: int) -> list[Encoded]:
        try:
            return [self.prompts[i]]
        except DataError as e:
            if self.bad is None:
                raise
            self._skip.add(i)
            where, _, why = str(e).partition(": ")
            self.bad.add(where, why)
            log.warning("skipping bad record (data.skip_bad): %s", e)
            if len(self._skip) == len(self.prompts):
                raise DataError(f"no usable prompts: {self.bad.summary()}") from e
            return []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved ``(epoch, pos)`` (the order of an epoch is a function of it)."""
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


NO_GROUND_TRUTH = ("no ground truth to score responses against (reward_model.ground_truth in verl parquet, "
                   "ground_truth in ShareGPT JSON or JSONL)")


def with_ground_truth(items: list, skip_bad: bool, bad: BadRecords | None) -> list:
    """``items`` (records, or encoded prompts with their ``.record``) whose record has a
    non-blank ground truth; one without raises ``DataError`` naming it, or with ``skip_bad``
    is counted in ``bad`` and dropped. A verifiable reward scored against an empty answer
    would give that prompt 0 accuracy for every response, silently."""
    keep = []
    for item in items:
        rec: Record = item if isinstance(item, Record) else item.record
        if rec.ground_truth is None or not str(rec.ground_truth).strip():
            skip_or_raise(rec, DataError(f"{rec.where('ground_truth')}: {NO_GROUND_TRUTH}"), skip_bad, bad)
        else:
            keep.append(item)
    return keep


def prompt_pool(path: str, processor, *, max_prompt_length: int, limit: int | None, skip_bad: bool,
                bad: BadRecords, need_ground_truth: bool = False) -> LazyPrompts:
    """The training prompts of ``path`` as a lazily encoded pool (images checked now; with
    ``need_ground_truth``, every record's ground truth too, see :func:`with_ground_truth`)."""
    records = read_limited(path, limit, skip_bad, bad)
    if need_ground_truth:
        records = with_ground_truth(records, skip_bad, bad)
    pool = LazyPrompts(records, processor, max_prompt_length).check_images(skip_bad, bad)
    if not len(pool):
        raise DataError(f"{path}: no usable prompts ({bad.summary()})")
    return pool

