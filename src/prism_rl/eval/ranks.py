"""``prism eval`` (held-out files) under torchrun: each rank generates a share, rank 0 writes.

The policy is not sharded for evaluation: each rank loads the full weights and decodes its
share of the prompts with no collective at all, so shares may differ by one prompt
(:func:`~prism_rl.distributed.uneven_shares`, balanced by a cost known before encoding: the
prompt's characters plus a fixed cost per image). The scored rows are then gathered, put in
the order of the prompts to do, and rank 0 writes the samples file and the summary exactly as
one process would. One process: every helper here is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import distributed as D
from ..data.records import BadRecords, Record

IMAGE_COST = 1000   # characters an image counts as when shares are balanced (a few hundred tokens)


def prompt_cost(rec: Record) -> float:
    """Characters of the record's messages plus :data:`IMAGE_COST` per image."""
    return sum(len(str(m.get("content", ""))) for m in rec.messages) + IMAGE_COST * len(rec.images)


def my_records(todo: list[Record]) -> list[Record]:
    """This rank's share of ``todo`` (all of it in one process), in ``todo`` order."""
    return [todo[i] for i in D.uneven_shares([prompt_cost(r) for r in todo], D.world())[D.rank()]]


def gather_rows(generate: Callable[[], list[dict]], todo: list[Record], bad: BadRecords) -> list[dict]:
    """Run ``generate()`` (this rank's rows) on every rank and return all ranks' rows in
    ``todo`` order (sample number within a prompt); bad records skipped on any rank are added
    to ``bad``. An exception on one rank is raised on every rank, not left to hang the others
    in the gather. One process: ``generate()``."""
    if not D.is_distributed():
        return generate()
    before = bad.count
    try:
        mine: tuple = ("ok", generate(), bad.reasons[before:])
    except Exception as e:  # re-raised on every rank below
        mine = ("error", e, [])
    parts = D.all_gather(mine)
    for kind, value, _ in parts:
        if kind == "error":
            raise value
    del bad.reasons[before:]
    for _, _, reasons in parts:
        bad.reasons.extend(reasons)
    place = {r.id: i for i, r in enumerate(todo)}
    rows = [row for _, value, _ in parts for row in value]
    return sorted(rows, key=lambda r: (place[r["id"]], r.get("sample", 0)))
