#!/usr/bin/env bash
# Issue 16, follow-up of the CPU study: PRISM+GRPO against a discriminator warmed up on pairs that
# differ only in content (teacher vs a public demonstration with one perception or reasoning slip,
# from a second synthetic pool), everything else as the study's prism_grpo arm (same SFT policy,
# disc init, 20 alignment + 30 GRPO steps at 8 x 8, same held-out problems). Evaluates the aligned
# and the PRISM+GRPO policies per seed; compare with bench/paired_compare.py.
# Usage (repo root): bash bench/stage2_content_disc.sh STUDY_OUT OUT [SEED ...]   (default seeds 0 1 2)
# STUDY_OUT: a folder of `bench/stage2_study.py --preset cpu` with the prism_grpo arm finished.
set -euo pipefail
S=${1:?usage: bench/stage2_content_disc.sh STUDY_OUT OUT [SEED ...]}; C=${2:?OUT}; shift 2
SEEDS=${*:-0 1 2}
P="${PYTHON:-python3} -m prism_rl.cli --threads 1"
D=$S/data/matched
mkdir -p "$C"
[ -f "$C/data/stats.json" ] || $P data synth --out "$C/data" --n 6000 --seed 1 --test-frac 0.15 --align-frac 0.2 \
    --teacher-frac 1.0 --public-error-rate 1.0 --public-style teacher > /dev/null
[ -f "$C/pairs.jsonl" ] || ${PYTHON:-python3} bench/disc_probe.py --data "$C/data/sft.json" --write-pairs "$C/pairs.jsonl"
for s in $SEEDS; do
  W=$C/s$s/warmup
  [ -f "$W/final/prism_discriminator.json" ] || $P disc warmup --config configs/quickstart/warmup.yaml \
      disc.path="$S/s$s/matched/disc/moe/init" data.train="$C/pairs.jsonl" output_dir="$W" train.seed="$s" train.epochs=2
  [ -f "$C/s$s/align/final/policy/config.json" ] || $P align --config configs/quickstart/align.yaml \
      model.path="$S/s$s/matched/sft/final" disc.path="$W/final" data.train="$D/align.parquet" output_dir="$C/s$s/align" \
      train.steps=20 train.seed="$s" rollout.prompts_per_step=8 rollout.n=8 rollout.max_new_tokens=160 \
      ppo.micro_batch_size=64 disc.batch_size=64
  [ -f "$C/s$s/rl/final/config.json" ] || $P rl --algo grpo --config configs/quickstart/rl.yaml \
      model.path="$C/s$s/align/final/policy" data.train="$D/align.parquet" data.eval="$D/test.parquet" \
      output_dir="$C/s$s/rl" train.steps=30 train.seed="$s" rollout.prompts_per_step=8 rollout.n=8 \
      rollout.max_new_tokens=160 algo.micro_batch_size=64
  for run in "aligned_content:$C/s$s/align/final/policy" "prism_grpo_content:$C/s$s/rl/final"; do
    $P eval --config configs/quickstart/eval.yaml --model "${run#*:}" --data "$D/test.parquet" --out "$C/eval" \
        --name "${run%%:*}_s$s" --max-new-tokens 160 generation.batch_size=64 data.limit=448 > /dev/null
  done
done
echo "compare: python bench/paired_compare.py --a $C/eval/prism_grpo_content_s{0,1,2} --b $S/eval/grpo_s{0,1,2}/heldout-test"
