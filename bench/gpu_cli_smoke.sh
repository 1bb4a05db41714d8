#!/usr/bin/env bash
# The real CLI on a GPU with a Qwen3-VL-2B-shaped checkpoint folder (random init): prism sft
# and prism rl (GRPO, GSPO) for a few steps each, through the same code as the quick start.
# Usage (on a GPU machine, repo root): bash bench/gpu_cli_smoke.sh OUT_DIR
set -euo pipefail
OUT=${1:-/tmp/prism_gpu_smoke}
mkdir -p "$OUT"
P="python3 -m prism_rl.cli"
python3 - "$OUT" <<'PY'
import sys, torch
from pathlib import Path
sys.path.insert(0, "bench")
from bench_gpu import build
from prism_rl.models.tiny import build_tiny, corpus_from_data
out = Path(sys.argv[1])
tiny = build_tiny(out / "tiny", corpus_from_data(None))
model, proc = build(tiny, torch.device("cpu"))
model.to(torch.bfloat16).save_pretrained(out / "big")
proc.save_pretrained(out / "big")
print("saved 2B-shaped checkpoint", sum(p.numel() for p in model.parameters()) / 1e9, "B params")
PY
$P data synth --out "$OUT/data" --n 200 --seed 0 > /dev/null
$P sft --config configs/quickstart/sft.yaml model.path="$OUT/big" data.train="$OUT/data/sft.json" \
  output_dir="$OUT/sft" data.max_length=2048 train.max_steps=6 train.batch_size=8 optim.lr=1e-5 train.log_every=1 \
  model.gradient_checkpointing=true 2>&1 | grep -v Warning | tail -1
for algo in grpo gspo; do
  $P rl --algo $algo --config configs/quickstart/rl.yaml model.path="$OUT/sft/final" \
    data.train="$OUT/data/align.parquet" output_dir="$OUT/rl_$algo" train.steps=2 rollout.n=8 \
    rollout.prompts_per_step=4 rollout.max_new_tokens=96 data.max_prompt_length=2048 optim.lr=1e-6 algo.micro_batch_size=16 \
    model.gradient_checkpointing=true 2>&1 | grep -v Warning | tail -1
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
sft = [json.loads(l) for l in open(f"{out}/sft/metrics.jsonl") if '"actor/loss"' in l]
print("| run | measure | value |\n|---|---|---|")
print(f"| prism sft (2B shape) | loss step 1 -> 6 | {sft[0]['actor/loss']:.3f} -> {sft[-1]['actor/loss']:.3f} |")
print(f"| prism sft (2B shape) | tokens/s (last step) | {sft[-1]['timing/tokens_per_s']:.0f} |")
for algo in ("grpo", "gspo"):
    rows = [json.loads(l) for l in open(f"{out}/rl_{algo}/metrics.jsonl") if '"rollout/reward"' in l]
    r = rows[-1]
    print(f"| prism rl --algo {algo} | step s (rollout/logprob/update) | {r['timing/step_s']:.1f} "
          f"({r['timing/rollout_s']:.1f}/{r['timing/logprob_s']:.1f}/{r['timing/update_s']:.1f}) |")
    print(f"| prism rl --algo {algo} | ratio mean / clip frac | {r['actor/ratio_mean']:.4f} / {r['actor/clip_frac']:.3f} |")
PY
