"""Is there signal in one RL batch's gradient? Cosine between the GRPO policy gradients of
independent rollout batches (4 batches of P prompts x 8 samples), with the verifiable reward
and with the same rewards shuffled. Equal cosines mean the batch gradient is mostly noise.

    PYTHONPATH=src python bench/grad_signal.py MODEL_DIR [P=32]   (reads runs/quickstart/data/align.parquet)
"""
import sys, torch, random
torch.set_num_threads(1)
from prism_rl.models.loading import load_policy, special_ids
from prism_rl.config import ModelConfig, AlgoConfig
from prism_rl.data.processing import load_prompts
from prism_rl.rollout.hf import HFEngine
from prism_rl.rollout.base import SamplingParams, micro_batch
from prism_rl.models.logprobs import response_logprobs
from prism_rl.rewards import compute_score
from prism_rl import algorithms as A
torch.manual_seed(0)
model, proc = load_policy(ModelConfig(path=sys.argv[1]), torch.device("cpu"), trainable=True)
eos, _ = special_ids(proc)
P = int(sys.argv[2]) if len(sys.argv) > 2 else 32
prompts = load_prompts("runs/quickstart/data/align.parquet", proc, eos_id=eos, max_length=768)
random.Random(0).shuffle(prompts)
eng = HFEngine(model, proc)
params = [p for p in model.parameters() if p.requires_grad]
def grad(ro, rew):
    adv = A.grpo_advantages(rew, ro.group_ids)
    model.zero_grad()
    rows = list(range(len(ro)))
    batch, Pst, mask = micro_batch(ro, rows)
    lp = response_logprobs(model, batch, Pst)
    loss, _ = A.policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params]).clone()
gs, gr = [], []
for b in range(4):
    ro = eng.generate(prompts[b*P:(b+1)*P], SamplingParams(n=8, max_new_tokens=160, temperature=1.0))
    acc = torch.tensor([compute_score(t, r.ground_truth).acc for t, r in zip(ro.texts, ro.records)])
    gs.append(grad(ro, acc))
    gr.append(grad(ro, acc[torch.randperm(len(acc))]))
    print(b, "acc", float(acc.mean()), flush=True)
cos = lambda a, b: float(a @ b / (a.norm() * b.norm() + 1e-30))
names = [n for n, p in model.named_parameters() if p.requires_grad]
sizes = [p.numel() for p in params]
import re, collections
groups = collections.OrderedDict()
off = 0
for n, k in zip(names, sizes):
    g = re.sub(r"\.(weight|bias)$", "", n)
    g = ("visual" if "visual" in n else g.split(".mlp")[0].split(".self_attn")[0].replace("model.language_model.", ""))
    groups.setdefault(g, []).append((off, off + k)); off += k
def sub(v, g): return torch.cat([v[a:b] for a, b in groups[g]])
for g in groups:
    r = [cos(sub(gs[i], g), sub(gs[j], g)) for i in range(4) for j in range(i+1, 4)]
    q = [cos(sub(gr[i], g), sub(gr[j], g)) for i in range(4) for j in range(i+1, 4)]
    nr = sum(float(sub(x, g).norm()**2) for x in gs) / 4
    print(f"{g:40s} n={sum(b-a for a,b in groups[g]):7d} |g|^2={nr:.2e} real {sum(r)/6:+.3f} rand {sum(q)/6:+.3f}")
print("real  pairwise cos:", [round(cos(gs[i], gs[j]), 4) for i in range(4) for j in range(i+1, 4)])
print("random pairwise cos:", [round(cos(gr[i], gr[j]), 4) for i in range(4) for j in range(i+1, 4)])
