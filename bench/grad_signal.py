"""Is there signal in one RL batch's gradient? Cosine between the GRPO policy gradients of
independent rollout batches (4 batches of P prompts x 8 samples), with the verifiable reward
and with the same rewards shuffled. Equal cosines mean the batch gradient is mostly noise.
Printed per parameter group (vision tower, embeddings, each decoder layer's blocks and norms)
and for the whole model.

    PYTHONPATH=src python bench/grad_signal.py MODEL_DIR [P=32]   (reads runs/quickstart/data/align.parquet)
"""
import random
import re
import sys
from itertools import combinations

import torch

from prism_rl import algorithms as A
from prism_rl.config import ModelConfig
from prism_rl.data.processing import load_prompts
from prism_rl.models.loading import load_policy, special_ids
from prism_rl.models.logprobs import response_logprobs
from prism_rl.reward import compute_score
from prism_rl.rollout.base import SamplingParams, micro_batch
from prism_rl.rollout.hf import HFEngine

BATCHES = 4


def group_of(name: str) -> str:
    """'visual' for the vision tower, else the module path without model prefix, weight/bias
    and the block inside a layer (so a decoder layer's attention and MLP form one group)."""
    if "visual" in name:
        return "visual"
    g = re.sub(r"\.(weight|bias)$", "", name).replace("model.language_model.", "")
    return g.split(".mlp")[0].split(".self_attn")[0]


def policy_grads(model, ro, rewards) -> dict[str, torch.Tensor]:
    """Flattened gradient of the on-policy GRPO token-mean loss, per parameter group."""
    adv = A.grpo_advantages(rewards, ro.group_ids)
    model.zero_grad()
    batch, start, mask = micro_batch(ro, list(range(len(ro))))
    lp = response_logprobs(model, batch, start)
    loss, _ = A.policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    loss.backward()
    parts: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(group_of(name), []).append(p.grad.flatten().clone())
    groups = {g: torch.cat(v) for g, v in parts.items()}
    groups["all"] = torch.cat(list(groups.values()))
    return groups


def mean_pairwise_cos(vectors: list[torch.Tensor]) -> float:
    cos = [float(a @ b / (a.norm() * b.norm() + 1e-30)) for a, b in combinations(vectors, 2)]
    return sum(cos) / len(cos)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, proc = load_policy(ModelConfig(path=sys.argv[1]), torch.device("cpu"), trainable=True)
    per_batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    eos, _ = special_ids(proc)
    prompts = load_prompts("runs/quickstart/data/align.parquet", proc, eos_id=eos, max_length=768)
    random.Random(0).shuffle(prompts)
    engine = HFEngine(model, proc)
    real, shuffled = [], []
    for b in range(BATCHES):
        ro = engine.generate(prompts[b * per_batch:(b + 1) * per_batch],
                             SamplingParams(n=8, max_new_tokens=160, temperature=1.0))
        acc = torch.tensor([compute_score(t, r.ground_truth).acc for t, r in zip(ro.texts, ro.records)])
        real.append(policy_grads(model, ro, acc))
        shuffled.append(policy_grads(model, ro, acc[torch.randperm(len(acc))]))
        print(f"batch {b}: accuracy {float(acc.mean()):.3f}", flush=True)
    print(f"{'group':36s} {'params':>8s} {'mean |g|^2':>10s} {'cos real':>9s} {'cos shuffled':>12s}")
    for g in real[0]:
        sq = sum(float(r[g].norm() ** 2) for r in real) / BATCHES
        print(f"{g:36s} {real[0][g].numel():8d} {sq:10.2e} {mean_pairwise_cos([r[g] for r in real]):+9.3f} "
              f"{mean_pairwise_cos([s[g] for s in shuffled]):+12.3f}")


if __name__ == "__main__":
    main()
