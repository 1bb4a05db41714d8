#!/usr/bin/env bash
# Does GRPO raise greedy held-out accuracy on the quick-start task when each step sees many
# more samples? Runs RL arms from the quick start's SFT checkpoint on every visible GPU (two
# arms per GPU: the tiny model leaves a GPU mostly idle), including a random-reward control,
# then scores each arm's newest policy greedily on the quick start's 900 held-out problems and
# on a second, larger held-out set. The RL problems come from a fresh pool (runs/pool, made by
# bench/make_rl_pool.py) that shares no image+question with either held-out set, so a gain
# cannot come from memorised test problems.
# An arm still running after RL_SECONDS is stopped and its newest checkpoint (every 10 steps)
# is scored; the table says which step. POOL_LIMIT (default 5000) caps the pool; the runs in
# docs/RESULTS.md used 5000, when prompts were still encoded up front.
# Usage (repo root, GPU machine): [ARMS=temp|batch|seeds] bash bench/rl_gpu_scale.sh OUT [RL_SECONDS] [MAX_STEPS]
set -uo pipefail
OUT=${1:-/tmp/rl_gpu_scale}; RL_SECONDS=${2:-380}; STEPS=${3:-300}
mkdir -p "$OUT"
P="python3 -m prism_rl.cli --threads 2"
SFT=runs/quickstart/sft/final
TEST=runs/quickstart/data/test.parquet; TEST2=runs/pool/test2.parquet
common=(--algo grpo --config configs/quickstart/rl.yaml data.train=runs/pool/rl_pool.parquet
        rollout.prompts_per_step=128 rollout.n=16 rollout.temperature=0.6 algo.micro_batch_size=512
        optim.lr=1e-4 train.steps=$STEPS train.save_every=10 data.limit=${POOL_LIMIT:-5000})
score() {  # policy_dir out_dir
  local ev="$P eval --config configs/quickstart/eval.yaml model.path=$1 generation.batch_size=512"
  $ev data.eval=$TEST output_dir=$2/eval name=policy && $ev data.eval=$TEST2 output_dir=$2/eval2 name=policy
}
arm() {  # gpu name overrides...
  local gpu=$1 name=$2; shift 2
  export CUDA_VISIBLE_DEVICES=$gpu
  timeout --signal=KILL $RL_SECONDS $P rl "${common[@]}" model.path=$SFT output_dir=$OUT/$name "$@" \
    > $OUT/$name.log 2>&1
  local policy=$OUT/$name/final
  [ -d "$policy" ] || policy=$(ls -d $OUT/$name/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  [ -n "$policy" ] || return 1
  echo "$policy" > $OUT/$name/evaluated.txt
  score $policy $OUT/$name >> $OUT/$name.log 2>&1
}
(export CUDA_VISIBLE_DEVICES=3; mkdir -p $OUT/sft; score $SFT $OUT/sft > $OUT/sft.log 2>&1) &
if [ "${ARMS:-temp}" = batch ]; then  # 2,048 samples a step: seeds, learning rates, control, 512-sample arm
  arm 0 g1e4_s0 train.seed=0 &
  arm 0 random_1e4_s0 train.seed=0 reward.function=bench/reward_random.py:score &
  arm 1 g1e4_s1 train.seed=1 &
  arm 1 g1e4_s2 train.seed=2 &
  arm 2 g5e5_s0 train.seed=0 optim.lr=5e-5 &
  arm 2 g2e4_s0 train.seed=0 optim.lr=2e-4 &
  arm 3 g1e4_b512_s0 train.seed=0 rollout.prompts_per_step=32 &
elif [ "${ARMS:-temp}" = seeds ]; then  # more seeds of the two best settings of ARMS=temp
  for s in 2 3; do arm 0 t03_s$s train.seed=$s rollout.temperature=0.3 & done
  for s in 4 5; do arm 1 t03_s$s train.seed=$s rollout.temperature=0.3 & done
  for s in 1 2; do arm 2 t06_3e4_s$s train.seed=$s optim.lr=3e-4 & done
  for s in 6 7; do arm 3 t03_s$s train.seed=$s rollout.temperature=0.3 & done
else  # rollout temperature 0.6 vs 0.3 (sampling nearer the greedy path), each with its control
  arm 0 t06_s0 train.seed=0 &
  arm 0 t06_s1 train.seed=1 &
  arm 1 t03_s0 train.seed=0 rollout.temperature=0.3 &
  arm 1 t03_s1 train.seed=1 rollout.temperature=0.3 &
  arm 2 t06_3e4_s0 train.seed=0 optim.lr=3e-4 &
  arm 2 t03_3e4_s0 train.seed=0 optim.lr=3e-4 rollout.temperature=0.3 &
  arm 3 random_t06_s0 train.seed=0 reward.function=bench/reward_random.py:score &
  arm 3 random_t03_s0 train.seed=0 rollout.temperature=0.3 reward.function=bench/reward_random.py:score &
fi
wait
python3 bench/rl_scale_table.py "$OUT"
