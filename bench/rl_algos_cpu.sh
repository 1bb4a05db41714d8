#!/usr/bin/env bash
# Issue 3's comparison on the quick start's tiny model: SFT -> DAPO and SFT -> GSPO with the
# same seed, data (the quick start's difficulty-filtered RL set) and number of steps as the
# quick start's SFT -> GRPO seed-0 run, then greedy held-out eval on the quick start's 448
# held-out problems (EVAL_LIMIT), so all four rows score the same problems. Run after `make quickstart`.
# Both runs go side by side, one torch thread each (2-core CPU).
set -euo pipefail
Q=${1:-runs/quickstart}
STEPS=${2:-30}
P=".venv/bin/python -m prism_rl.cli --threads 1"
run() {  # algo extra-overrides...
  local algo=$1; shift
  $P rl --algo "$algo" --config configs/quickstart/rl.yaml model.path="$Q/sft/final" \
    data.train="$Q/data/rl.parquet" output_dir="$Q/sft_${algo}_s0" train.steps="$STEPS" train.seed=0 "$@" \
    > "$Q/logs/sft_${algo}_s0.log" 2>&1
  $P eval --config configs/quickstart/eval.yaml --model "$Q/sft_${algo}_s0/final" --data "$Q/data/test.parquet" \
    --out "$Q/eval" --name "sft_${algo}_s0" data.limit="${EVAL_LIMIT:-448}" > "$Q/logs/eval-sft_${algo}_s0.log" 2>&1
  $P plot "$Q/sft_${algo}_s0" > /dev/null
}
# DAPO scaled like the rest of the quick start: gen batch 2x the train batch, at most 3 rounds,
# overlong buffer 40 of the 160-token limit (spec: 96 prompts / 10 rounds / 4096 of 8192).
run dapo rollout.gen_batch_prompts=16 algo.max_num_gen_batches=3 algo.overlong_buffer=40 &
run gspo &
wait
.venv/bin/python - "$Q" <<'PY'
import json, sys
from pathlib import Path
q = Path(sys.argv[1])
print("| run | avg acc | format | resp tokens | mean step s |\n|---|---|---|---|---|")
for name in ("sft", "sft_grpo_s0", "sft_dapo_s0", "sft_gspo_s0"):
    s = json.loads((q / "eval" / name / "heldout-test" / "summary.json").read_text())["overall"]
    m = [json.loads(l) for l in open(q / name / "metrics.jsonl")] if (q / name / "metrics.jsonl").exists() and name != "sft" else []
    t = [r["timing/step_s"] for r in m if "timing/step_s" in r]
    print(f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['format_rate']:.1f} | {s['mean_response_tokens']:.0f} | "
          f"{sum(t) / len(t) if t else float('nan'):.1f} |")
PY
