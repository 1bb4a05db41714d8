#!/usr/bin/env bash
# Wheels bench/run.py needs on the GPU machine that its image lacks (.library/device/KINDS.md's
# package list): TRL 1.16 and datasets with their missing dependencies (dill, multiprocess), and
# pydantic (prism_rl.config) with its own, and math-verify with its own but sympy (the accuracy
# reward's symbolic fallback: without it a GPU run now stops with MathVerifyUnavailable; before,
# it scored those answers 0). Everything else they need (accelerate, transformers,
# huggingface-hub, pyarrow, pandas, fsspec, xxhash, sympy, ...) is in the image.
#
# Run here, in the repo root (needs the package index); once per clone: echo /.whl/ >> .git/info/exclude
#   bash bench/trl_wheels.sh            # -> .whl/ (or WHL_DIR), about 3 MiB
# Then the GPU call carries .whl and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHL_DIR:-.whl}
PIP=${PIP:-python3 -m pip}
# name==version, as pinned against what the image holds (Python 3.12, huggingface-hub 1.33)
PINS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
      math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2)
mkdir -p "$DEST"
for pin in "${PINS[@]}"; do   # one version of each: two wheels of one package stop the install
  name=$(echo "${pin%%==*}" | tr - _)
  rm -f "$DEST/$name"-*.whl
done
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
ls -l "$DEST"
kib=$(du -sk "$DEST" | cut -f1)
echo "total ${kib} KiB in $DEST"
if [ "$kib" -gt $((60 * 1024)) ]; then
  echo "over 60 MiB: the device call carries at most 64 MiB with the working tree" >&2
  exit 1
fi
