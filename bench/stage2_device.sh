#!/usr/bin/env bash
# Runs one stage-2 study (bench/stage2_study.py) that is longer than one device call allows, over
# several back-to-back calls on one warm machine. The first call starts the study in its own
# process session (setsid: it outlives the call that started it, until the machine goes back);
# every call then follows its log until the study ends or WAIT_S seconds pass, and copies what is
# small of the study folder (reports, evaluation summaries, metrics, logs; no checkpoints) into
# OUT, so a lost machine still leaves the evaluations finished so far.
# Usage (repo root, GPU machine): bash bench/stage2_device.sh OUT [stage2_study.py args ...]
#   the args start the study; later calls give OUT alone (args given to a started study are an
#   error, not ignored).
#   WORK=/tmp/s2dev (the study folder)  WAIT_S=560 (how long one call follows the study)
set -uo pipefail
OUT=${1:?usage: bench/stage2_device.sh OUT [stage2_study.py args ...]}; shift
W=${WORK:-/tmp/s2dev}
WAIT_S=${WAIT_S:-560}
mkdir -p "$OUT"
t0=$(date +%s)

if [ -f "$W.pid" ] && [ $# -gt 0 ]; then
  echo "bench/stage2_device.sh: a study already runs in $W (started with $(head -1 "$W.log" 2>/dev/null));" \
       "its arguments cannot change: call again with OUT alone, or use another WORK" >&2
  exit 2
fi
if [ ! -f "$W.pid" ]; then
  mkdir -p "$W"
  echo "starting: python3 bench/stage2_study.py --out $W $*"
  setsid nohup python3 bench/stage2_study.py --out "$W" "$@" > "$W.log" 2>&1 < /dev/null &
  echo $! > "$W.pid"
fi
pid=$(cat "$W.pid")

# Follow the study: print new log lines until it ends or this call's time is up.
seen=0
while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$WAIT_S" ]; do
  sleep 10
  n=$(wc -l < "$W.log")
  [ "$n" -gt "$seen" ] && { sed -n "$((seen + 1)),${n}p" "$W.log" | grep -v '^ *$' | tail -40; seen=$n; }
done
if kill -0 "$pid" 2>/dev/null; then
  echo "STUDY STILL RUNNING after this call's ${WAIT_S} s; call again to follow it"
else
  sed -n "$((seen + 1)),\$p" "$W.log"
  echo "STUDY FINISHED"
fi

# What comes back: the study's reports and figure beside a tarball of its small files.
for f in results.md results.json jobs.json dynamics.png; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
cp "$W.log" "$OUT/study.log"
(cd "$W" && find . -type f -size -3M ! -name '*.safetensors' ! -name '*.pt' ! -name '*.parquet' \
   ! -name '*.bin' ! -path './data/*/images/*' -print0 | tar --null -czf "$OUT/small_files.tgz" -T -)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
ls -la "$OUT"
