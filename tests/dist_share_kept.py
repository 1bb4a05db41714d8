"""``rl_dist.share_kept`` under ``torchrun --nproc-per-node 2`` (usage: ``dist_share_kept.py OUT_DIR``):
rank 0 kept groups 0, 1, 2 and rank 1 kept group 5 (DAPO's kept groups, unevenly spread); after
sharing, each rank holds 2 whole groups with their rows' scores. A second case keeps 5 groups,
which do not split over 2 ranks: the last is dropped. Writes ``rank<r>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from prism_rl import distributed as D
from prism_rl.data.records import Record
from prism_rl.rollout.base import Rollouts
from prism_rl.trainers.rl_dist import share_kept

N = 2   # rows per group


def rollouts(groups: list[int]) -> tuple[Rollouts, dict]:
    B = N * len(groups)
    gid = torch.tensor(groups).repeat_interleave(N)
    ro = Rollouts(prompt_ids=torch.ones(B, 3, dtype=torch.long), prompt_mask=torch.ones(B, 3, dtype=torch.long),
                  prompt_mm_types=torch.zeros(B, 3, dtype=torch.long), response_ids=gid[:, None].repeat(1, 2),
                  response_mask=torch.ones(B, 2, dtype=torch.long), group_ids=gid, texts=[str(int(g)) for g in gid],
                  finish_reasons=["stop"] * B, records=[Record(id=str(int(g)), messages=[]) for g in gid])
    return ro, {"reward": gid.float() / 10}


def main(out: str) -> None:
    D.init_from_env()
    report = []
    for mine in ([[0, 1, 2], [5]], [[0, 1, 2], [5, 7]]):
        ro, sc = rollouts(mine[D.rank()])
        got, scores = share_kept(ro, sc, pad_id=0)
        report.append({"groups": got.group_ids.tolist(), "texts": got.texts, "reward": scores["reward"].tolist(),
                       "ids": got.response_ids[:, 0].tolist()})
    Path(out, f"rank{D.rank()}.json").write_text(json.dumps(report))
    D.finish()


if __name__ == "__main__":
    main(sys.argv[1])
