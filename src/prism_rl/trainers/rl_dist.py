"""The RL batch under torchrun: global group ids, DAPO's kept groups agreed over ranks, and
the kept groups shared out again so every rank trains on an equal share of the 1-process batch.

Each rank samples whole groups (its prompts of the round's global batch). DAPO's dynamic
sampling keeps only groups whose accuracy varies, and which ones vary is only known after
scoring, so the kept groups end up unevenly spread over the ranks. One process keeps the first
``prompts_per_step`` of them in (round, prompt) order; here every rank learns every rank's kept
group ids (a list of ints per round), so all agree on the same first ``prompts_per_step`` and on
when to stop sampling. The kept rollouts are then gathered and each rank takes an equal, token-
balanced share of the groups (:func:`distributed.my_share`): the global batch is the one
process's, and the update's forwards match in number across ranks.
"""

from __future__ import annotations

import logging

import torch

from .. import distributed as D
from ..rollout.base import Rollouts, concat_rollouts

log = logging.getLogger(__name__)


def global_group_ids(ro: Rollouts, mine: list[int], offset: int) -> Rollouts:
    """Rename the engine's group ids (``offset + k`` for this rank's k-th prompt) to
    ``offset + mine[k]``, the prompt's place in the round's global batch, as one process numbers
    them. One process: ``mine`` is 0..k-1 and nothing changes."""
    ro.group_ids = torch.tensor(mine, dtype=torch.long)[ro.group_ids - offset] + offset
    return ro


def all_groups(groups: list[int]) -> list[int]:
    """Every rank's group ids, ascending (the order one process lists a round's groups in)."""
    return sorted(g for part in D.all_gather(list(groups)) for g in part)


def share_kept(ro: Rollouts | None, sc: dict | None, pad_id: int) -> tuple[Rollouts | None, dict | None]:
    """All ranks' kept rollouts (``ro``/``sc``: this rank's, ``None`` when it kept none) gathered,
    rows put in group order, and this rank's share of the groups returned: equal group counts per
    rank, balanced by prompt tokens. A group count that does not split evenly drops its last
    ``count % ranks`` groups (logged): the ranks' forwards under FSDP2 must match in number.
    Returns ``(None, None)`` when fewer groups than ranks were kept."""
    parts = [p for p in D.all_gather((ro, sc)) if p[0] is not None]
    if not parts:
        return None, None
    ro = concat_rollouts([p[0] for p in parts], pad_id)
    sc = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    ids = ro.group_ids.tolist()
    groups = sorted(set(ids))
    usable = len(groups) - len(groups) % D.world()
    if usable < len(groups):
        log.warning("dynamic sampling kept %d groups, not a multiple of the %d processes: training on the first %d",
                    len(groups), D.world(), usable)
    if usable == 0:
        return None, None
    groups = groups[:usable]
    first_row = {g: ids.index(g) for g in groups}
    cost = [float(ro.prompt_mask[first_row[g]].sum()) for g in groups]
    mine = {groups[i] for i in D.my_share(cost)}
    rows = sorted((i for i, g in enumerate(ids) if g in mine), key=lambda i: (ids[i], i))
    return ro.select(rows), {k: v[rows] for k, v in sc.items()}
