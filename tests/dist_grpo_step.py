"""Two GRPO steps on the tiny model, run by tests/test_distributed.py as one process and under
``torchrun --nproc-per-node 2`` (usage: ``dist_grpo_step.py MODEL_DIR OUT_DIR [spread|one-rank]``).

Each rank takes its prompts of the global batch (``rl.rank_prompts``: whole groups), samples
them with the rollout engine on the unsharded rollout copy (``distributed.rollout_model``),
scores them, computes group-normalised advantages, the old log-probs and a PPO update on the
FSDP2-sharded policy (``actor.ppo_update``), then gathers the new weights into the rollout copy
(``distributed.sync_weights``, timed) for the second step. Each prompt is sampled under its own
seed, so the samples do not depend on which rank drew the prompt: 1 and 2 processes must then
give the same rollouts, advantages, losses and weights. The reward is a fixed function of the
token ids (the share of ids divisible by 3), so the groups have non-zero advantages.
Writes ``rank<r>.json`` (per step: advantages by global group, pg_loss, grad_norm, sync time)
and, from rank 0, ``weights.pt`` (the full state dict).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from prism_rl import algorithms as A
from prism_rl import distributed as D
from prism_rl.actor import ppo_update, sequence_logprobs
from prism_rl.config import AlgoConfig, ModelConfig, OptimConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.models.loading import load_policy
from prism_rl.models.shared_vision import vision_owner
from prism_rl.rollout.base import SamplingParams, concat_rollouts
from prism_rl.rollout.hf import HFEngine
from prism_rl.trainers.dist_checkpoint import gather_full_state_dict
from prism_rl.trainers.optim import build_optimizer, build_scheduler
from prism_rl.trainers.rl import rank_prompts

from conftest import png_bytes

N, STEPS = 4, 2
QUESTIONS = ["How many?", "Add the digits of 12345.", "What colour is the big shape here, please?", "Name a prime number."]
# which prompts show an image: "spread" two (the cost-balanced split gives each of 2 ranks one),
# "one-rank" one, so the other rank has none and runs the shared vision pass's dummy images
LAYOUTS = {"spread": {0: "red", 2: "blue"}, "one-rank": {0: "red"}}


def records(layout: str = "spread") -> list[Record]:
    colours = LAYOUTS[layout]
    return [Record(id=str(i), messages=[{"role": "user", "content": ("<image>" if i in colours else "") + text}],
                   images=[ImageRef(data=png_bytes(colours[i]))] if i in colours else [])
            for i, text in enumerate(QUESTIONS)]


def main(model_dir: str, out_dir: str, layout: str = "spread") -> None:
    device = D.init_from_env()
    cfg = ModelConfig(path=model_dir)
    torch.manual_seed(0)
    model, proc = load_policy(cfg, D.load_device(device), trainable=True)
    model = D.shard_model(model, device)
    gen = D.rollout_model(model, lambda: load_policy(cfg, device, trainable=False)[0])
    engine = HFEngine(gen, proc)
    prompts = [encode_prompt(proc, r) for r in records(layout)]
    mine = rank_prompts(prompts)
    index = [next(i for i, p in enumerate(prompts) if p is q) for q in mine]
    algo = AlgoConfig(micro_batch_size=3)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0), STEPS)
    seen: list[int] = []   # patches through the vision tower (models/shared_vision.py runs it per distinct image)
    vision_owner(model).visual.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].shape[0])))
    report = []
    for step in range(STEPS):
        parts = []
        for i, p in zip(index, mine):  # each group under its own seed: the same samples on any rank
            torch.manual_seed(1000 * step + i)
            parts.append(engine.generate([p], SamplingParams(n=N, max_new_tokens=10), group_offset=i))
        ro = concat_rollouts(parts, engine.pad_id)
        ids = ro.response_ids.masked_fill(~ro.response_mask.bool(), 1)
        reward = ((ids % 3 == 0) & ro.response_mask.bool()).sum(1) / ro.response_mask.sum(1).clamp(min=1)
        adv = A.grpo_advantages(reward.float(), ro.group_ids)
        seen.clear()
        old_lp = sequence_logprobs(model, ro, micro=3, device=device)
        upd = ppo_update(model, opt, sched, ro, adv, old_lp, algo, 1.0, device, seed=step)
        t = time.perf_counter()
        D.sync_weights(model, gen)
        sync_s = time.perf_counter() - t
        groups = {str(g): adv[ro.group_ids == g].tolist() for g in ro.group_ids.unique().tolist()}
        responses = {str(g): [ro.response_ids[r][ro.response_mask[r].bool()].tolist() for r in range(len(ro))
                              if int(ro.group_ids[r]) == g] for g in ro.group_ids.unique().tolist()}
        report.append({"adv": groups, "responses": responses, "pg_loss": upd["pg_loss"], "grad_norm": upd["grad_norm"],
                       "sync_s": sync_s, "tower_patches": sum(seen), "row_patches": sum(ro.extras["patches_per_row"])})
    state = gather_full_state_dict(model)
    out = Path(out_dir)
    (out / f"rank{D.rank()}.json").write_text(json.dumps(report))
    if D.is_main():
        torch.save({k: v.detach().cpu() for k, v in state.items()}, out / "weights.pt")
    D.finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
