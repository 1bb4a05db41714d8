#!/bin/bash
# Launch a prism-rl stage on several nodes under Slurm with torchrun (one task per node; torchrun
# starts one process per GPU and they meet at a c10d rendezvous on the first node).
# Usage: sbatch --nodes 2 bench/slurm_torchrun.sh sft --config configs/qwen3vl/8b/sft.yaml
# What is distributed today (README "Several GPUs"): SFT and the RL step (GRPO/GSPO without dynamic
# sampling); checkpoints under torchrun are not written yet, only the final model.
#SBATCH --job-name=prism
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" \
  -m prism_rl.cli "$@"
