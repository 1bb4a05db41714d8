#!/usr/bin/env bash
# Issue 14's measurements on one machine with 2 GPUs (random-init real shapes, synthetic data
# with 448 px images): an RL step of the 4B shape on 1 GPU and on 2 (torchrun, FSDP2), the 8B
# shape's RL step with 8,192-token responses, and an alignment step with the 8B policy beside a
# 2B-shaped discriminator upcycled to 4 experts (2,048-token prompt cap, 6,144-token responses).
# Each run is stopped once its last timed step is logged (no final save of a random model);
# peak memory per card is nvidia-smi's (the caching allocator's reservation plus the CUDA
# context), sampled every 0.5 s, beside rank 0's `memory/peak_gib` from the run's metrics.
# Usage (repo root, GPU machine): bash bench/dist_scale.sh OUT [PART ...]
#   parts: build rl4b_1 rl4b_2 rl8b align8b (default: all, in that order), and scale1 scale2
#   scale4 scale8: issue 17's scaling workload (4B, GRPO, 32 prompts x 16 samples x 2,048 tokens,
#   one warm-up and one timed step) on 1, 2, 4 or 8 GPUs; align8b and rl8b take NGPU (default 2)
#   PART_MAX_S=N: stop a run after N s even if its steps are not all logged (default 600)
#   SMALL=1: tiny shapes and lengths, 96 px images: the same runs on a CPU in a few minutes (a smoke test)
set -uo pipefail
OUT=${1:?usage: bench/dist_scale.sh OUT [PART ...]}; shift
PARTS=${*:-build rl4b_1 rl4b_2 rl8b align8b}
W=${WORK:-/tmp/dist_scale}
mkdir -p "$OUT" "$W"
P1="python3 -m prism_rl.cli"
P2="python3 -m torch.distributed.run --standalone --nproc-per-node ${NGPU:-2} -m prism_rl.cli"
pn() { if [ "$1" = 1 ]; then echo "$P1"; else echo "python3 -m torch.distributed.run --standalone --nproc-per-node $1 -m prism_rl.cli"; fi; }
S2=2b S4=4b S8=8b IMG=448 T4=512 T8=8192 TA=6144 TS=2048
[ "${SMALL:-0}" = 1 ] && { S2=tiny S4=tiny S8=tiny IMG=96 T4=16 T8=24 TA=24 TS=16; }
RL=(--algo grpo --config configs/quickstart/rl.yaml data.train=$W/data/align.parquet data.eval=
    rollout.temperature=1.0 data.max_prompt_length=2048 optim.lr=1e-6 model.gradient_checkpointing=true
    train.save_every=null train.log_every=1)

build() {
  [ -f "$W/m4b/config.json" ] || python3 bench/make_shape_folder.py --shape $S4 --out "$W/m4b" --image-size $IMG
  [ -f "$W/m8b/config.json" ] || python3 bench/make_shape_folder.py --shape $S8 --out "$W/m8b" --image-size $IMG
  [ -f "$W/m2b/config.json" ] || python3 bench/make_shape_folder.py --shape $S2 --out "$W/m2b" --image-size $IMG
  [ -f "$W/d2b/config.json" ] || $P1 disc init --from "$W/m2b" --out "$W/d2b" --experts 4 --top-k 2 | tail -1
  [ -f "$W/data/align.parquet" ] || $P1 data synth --out "$W/data" --n 400 --image-size $IMG --seed 0 > /dev/null
}

# timed NAME STEPS CMD...: run CMD, stop it once metrics.jsonl under $W/NAME has STEPS rows
timed() {
  local name=$1 steps=$2; shift 2
  rm -rf "$W/$name"; mkdir -p "$W/$name"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/smi_$name.csv" &
  local smi=$!
  setsid "$@" output_dir="$W/$name" > "$OUT/$name.log" 2>&1 &
  local pid=$! t0=$SECONDS
  while kill -0 $pid 2>/dev/null; do
    if [ -f "$W/$name/metrics.jsonl" ] && [ "$(grep -c '"timing/step_s"' "$W/$name/metrics.jsonl")" -ge "$steps" ]; then
      sleep 1; kill -- -$pid 2>/dev/null; break
    fi
    if [ $((SECONDS - t0)) -gt "${PART_MAX_S:-600}" ]; then
      echo "$name: stopped after ${PART_MAX_S:-600} s"; kill -- -$pid 2>/dev/null; break
    fi
    sleep 2
  done
  wait $pid 2>/dev/null; kill $smi 2>/dev/null
  cp "$W/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null || tail -20 "$OUT/$name.log"
  echo "$name: $((SECONDS - t0)) s wall"
}

for part in $PARTS; do
  case $part in
    build) build ;;
    rl4b_1) timed rl4b_1 3 $P1 rl "${RL[@]}" model.path=$W/m4b train.steps=3 rollout.prompts_per_step=16 rollout.n=8 \
              rollout.max_new_tokens=$T4 algo.micro_batch_size=16 ;;
    rl4b_2) timed rl4b_2 3 $P2 rl "${RL[@]}" model.path=$W/m4b train.steps=3 rollout.prompts_per_step=16 rollout.n=8 \
              rollout.max_new_tokens=$T4 algo.micro_batch_size=16 ;;
    rl8b) timed rl8b 1 $P2 rl "${RL[@]}" model.path=$W/m8b train.steps=1 rollout.prompts_per_step=2 rollout.n=8 \
            rollout.max_new_tokens=$T8 algo.micro_batch_size=2 ;;
    align8b) timed align8b 1 $P2 align --config configs/quickstart/align.yaml model.path=$W/m8b disc.path=$W/d2b \
               data.train=$W/data/align.parquet rollout.prompts_per_step=2 rollout.n=16 rollout.max_new_tokens=$TA \
               data.max_prompt_length=2048 optim.lr=1e-6 disc_optim.lr=1e-6 ppo.micro_batch_size=2 disc.batch_size=4 \
               model.gradient_checkpointing=true disc.gradient_checkpointing=true disc.cpu_offload=true \
               train.save_every=null train.log_every=1 train.steps=1 ;;
    scale[1248]) n=${part#scale}
      timed $part 2 $(pn $n) rl "${RL[@]}" model.path=$W/m4b train.steps=2 rollout.prompts_per_step=32 rollout.n=16 \
        rollout.max_new_tokens=$TS algo.micro_batch_size=16 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
python3 bench/dist_scale_table.py "$OUT"
