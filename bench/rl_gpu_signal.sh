#!/usr/bin/env bash
# Does GRPO raise held-out accuracy on the quick-start task when it gets the spec's batch
# (32 prompts x 16 samples per step) instead of the CPU quick start's 8 x 8? Runs several RL
# arms at once on one GPU from the quick start's SFT checkpoint (carried in runs/), including
# a random-reward control, then evaluates every final policy greedily on the 900 held-out
# problems. An arm that has not finished after RL_SECONDS is stopped and its newest checkpoint
# (saved every 10 steps) is evaluated instead; the table says which step was evaluated.
# Usage (repo root, GPU machine): [ARMS=lr|temp] bash bench/rl_gpu_signal.sh OUT STEPS [RL_SECONDS]
set -uo pipefail
OUT=${1:-/tmp/rl_gpu_signal}; STEPS=${2:-40}; RL_SECONDS=${3:-100000}
mkdir -p "$OUT"
P="python3 -m prism_rl.cli --threads 2"
D=runs/quickstart/data
common=(--algo grpo --config configs/quickstart/rl.yaml data.train=$D/align.parquet
        rollout.prompts_per_step=32 rollout.n=16 algo.micro_batch_size=128 train.steps=$STEPS train.save_every=10)
arm() {  # name sft_dir overrides...
  local name=$1 sft=$2; shift 2
  timeout --signal=KILL $RL_SECONDS $P rl "${common[@]}" model.path=$sft output_dir=$OUT/$name "$@" > $OUT/$name.log 2>&1
  local policy=$OUT/$name/final
  [ -d "$policy" ] || policy=$(ls -d $OUT/$name/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  [ -n "$policy" ] || return 1
  echo "$policy" > $OUT/$name/evaluated.txt
  $P eval --config configs/quickstart/eval.yaml model.path=$policy data.eval=$D/test.parquet \
     output_dir=$OUT/$name/eval name=policy >> $OUT/$name.log 2>&1
}
SFT=runs/quickstart/sft/final  # runs/exp/sfte8 (ARMS=lr) is `prism sft` with train.epochs=8, its final/ folder
$P eval --config configs/quickstart/eval.yaml model.path=$SFT output_dir=$OUT/sft_eval name=policy > $OUT/sft_eval.log 2>&1 &
if [ "${ARMS:-lr}" = lr ]; then  # learning rates, a random-reward control, a longer-SFT start
  arm grpo_1e4 $SFT optim.lr=1e-4 &
  arm grpo_3e5 $SFT optim.lr=3e-5 &
  arm random_1e4 $SFT optim.lr=1e-4 reward.function=bench/reward_random.py:score &
  $P eval --config configs/quickstart/eval.yaml model.path=runs/exp/sfte8 output_dir=$OUT/sfte8_eval name=policy > $OUT/sfte8_eval.log 2>&1 &
  arm e8_grpo_1e4 runs/exp/sfte8 optim.lr=1e-4 &
else  # rollout temperature: sample near the greedy mode, with its random-reward control
  arm grpo_1e4_t1 $SFT optim.lr=1e-4 &
  arm grpo_1e4_t06 $SFT optim.lr=1e-4 rollout.temperature=0.6 &
  arm random_1e4_t06 $SFT optim.lr=1e-4 rollout.temperature=0.6 reward.function=bench/reward_random.py:score &
fi
wait
python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
print("| run | policy | greedy acc | by task | train acc first5 -> last5 | s/step |\n|---|---|---|---|---|---|")
for d in sorted(glob.glob(f"{out}/*/")):
    name = os.path.basename(d.rstrip("/"))
    held = "policy/heldout-test/summary.json"  # prism eval's layout: <output_dir>/<name>/heldout-<file>/
    ev = f"{d}/eval/{held}" if os.path.exists(f"{d}/eval/{held}") else f"{d}/{held}"
    if not os.path.exists(ev) or "overall" not in json.load(open(ev)):
        print(f"| {name} | | (no eval) | | | |"); continue
    pol = open(f"{d}/evaluated.txt").read().strip().split("/")[-1] if os.path.exists(f"{d}/evaluated.txt") else "sft"
    s = json.load(open(ev))
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")] if os.path.exists(f"{d}/metrics.jsonl") else []
    rows = [r for r in rows if "rollout/acc" in r]
    tr = (f"{sum(r['rollout/acc'] for r in rows[:5])/5:.3f} -> {sum(r['rollout/acc'] for r in rows[-5:])/5:.3f}" if len(rows) >= 5 else "")
    sp = f"{sum(r['timing/step_s'] for r in rows)/len(rows):.1f}" if rows else ""
    fam = " ".join(f"{k} {v['accuracy']*100:.1f}" for k, v in s["per_task"].items())
    print(f"| {name} | {pol} | {s['overall']['accuracy']*100:.1f} | {fam} | {tr} | {sp} |")
PY
