"""Debugging aid: one RL run with autograd anomaly detection, so the first NaN produced in a
backward pass raises with the traceback of the forward op that made it. This is how the cuDNN
attention-backward NaN (see models/logprobs.py) was found on an H100.

    PYTHONPATH=src python bench/nan_hunt.py output_dir=/tmp/nh data.train=... [overrides]
"""
import sys
import traceback

import torch

from prism_rl.config import ALGO_PRESETS, RLConfig, load_config
from prism_rl.trainers.rl import train_rl

torch.autograd.set_detect_anomaly(True, check_nan=True)
cfg = load_config(RLConfig, "configs/quickstart/rl.yaml", sys.argv[1:], defaults=ALGO_PRESETS["grpo"])
try:
    train_rl(cfg)
    print("no NaN within", cfg.train.steps, "steps")
except Exception:
    traceback.print_exc()
