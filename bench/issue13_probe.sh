#!/usr/bin/env bash
# Issue 13: what the seventh session built on the CPU, measured against what it replaced, in one
# call on one H200 (about 8 minutes; parts can go in separate calls):
#   sampler        the sampling step, torch ops vs the one kernel, 64 and 512 rows (sampler_probe.py)
#   engine         the graph engine at 64 and 512 rows x 512 new tokens: as shipped (packed
#                  prefill, sampling kernel) vs torch sampling vs one prefill forward per prompt
#   engine_seeded  the same with per-row seeded sampling (rollout.per_row_seeds), shipped vs torch sampling
#   generate       the shipped engine vs transformers' generate at 512 rows (the >= 10x target)
#   update         ppo_update's profile: time, host waits, top ops by input shape (update_profile.py)
# Usage (repo root, GPU machine, PYTHONPATH=src:bench): bash bench/issue13_probe.sh OUT [PART ...]
# TINY=DIR: the tiny checkpoint whose processor the probes use (built there if missing).
set -uo pipefail
OUT=${1:?usage: bench/issue13_probe.sh OUT [PART ...]}; shift
PARTS=${*:-sampler engine engine_seeded generate update}
TINY=${TINY:-/tmp/tiny}
mkdir -p "$OUT"
[ -f "$TINY/config.json" ] || python3 -c "from prism_rl.models.tiny import build_tiny, corpus_from_data; \
build_tiny('$TINY', corpus_from_data(None))"
PROBE=(python3 bench/engine_probe.py --tiny-dir "$TINY" --new 512)
for part in $PARTS; do
  echo "== $part"
  case $part in
    sampler) python3 bench/sampler_probe.py --out "$OUT/sampler.json" ;;
    engine) "${PROBE[@]}" --rows 64 512 --no-generate \
              --variants fused-splitk fused-splitk-torchsample fused-splitk-prefill1 ;;
    engine_seeded) "${PROBE[@]}" --rows 64 512 --no-generate --seeded --variants fused-splitk fused-splitk-torchsample ;;
    generate) "${PROBE[@]}" --rows 512 --variants fused-splitk ;;
    update) python3 bench/update_profile.py --variants base --out "$OUT/update_profile.json" ;;
    *) echo "unknown part $part (sampler engine engine_seeded generate update)"; exit 2 ;;
  esac 2>&1 | tee "$OUT/$part.txt"
done
