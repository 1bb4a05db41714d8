"""Pieces every trainer loop shares: optimizer and schedule, metrics, checkpoints, RNG state.

Checkpoint layout (``<output_dir>/checkpoint-<step>/``): an ordinary Hugging Face folder
(``model.safetensors`` + config + processor files, loadable by ``from_pretrained``) plus
``trainer_state.pt`` holding the optimizer, scheduler, RNG states and the data position, so
that ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import OptimConfig, save_config
from ..models.loading import load_policy, pick_device, set_pixel_limits

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warm-up: (step + 1) / warmup for step < warmup. Then, with
    progress p = (step - warmup) / max(1, total - warmup):
    constant 1; linear 1 - p; cosine 0.5 (1 + cos(pi p)).
    """
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))


def autocast_for(device: torch.device):
    """bf16 autocast on GPU (weights and optimizer states stay fp32); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but never fail a run over logging
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, models: dict[str, Any], processor,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Save ``models`` (name -> HF model; "" means the folder itself) and the trainer state.

    Writes to a temporary folder and renames it, so a crash mid-save never leaves a
    half-written checkpoint that ``--resume`` would pick up. Keeps the newest ``keep``.
    """
    out = Path(out_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in models.items():
        target = tmp / name if name else tmp
        # HF models have save_pretrained; the discriminator saves backbone + value head itself
        save = getattr(model, "save_pretrained", None) or model.save
        save(target)
        if processor is not None:
            processor.save_pretrained(target)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def start_run(cfg, resume: bool):
    """Write the resolved config, seed, pick the device, find the checkpoint to resume from.

    Returns ``(output folder, device, checkpoint or None)``.
    """
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    seed_everything(cfg.train.seed)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    return out, pick_device(), ckpt


@contextmanager
def checkpoint_on_interrupt(save, closers=()):
    """Ctrl-C inside the block saves a checkpoint (``save()``) before re-raising; the
    progress bar and logger in ``closers`` are closed whatever happens."""
    try:
        yield
    except KeyboardInterrupt:
        path = save()
        log.warning("interrupted: checkpoint saved to %s; continue with --resume", path)
        raise
    finally:
        for c in closers:
            c.close()


def load_stage_policy(cfg, device, resume_from: Path | None = None):
    """The stage's trainable policy and processor: from ``cfg.model`` or, when resuming, from
    the checkpoint folder ``resume_from``; the processor gets ``cfg.data``'s pixel limits."""
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"path": str(resume_from)})
    model, processor = load_policy(model_cfg, device, trainable=True)
    set_pixel_limits(processor, cfg.data.max_pixels, cfg.data.min_pixels)
    return model, processor


def save_final(folder: Path, model, processor) -> Path:
    """The final model as a plain Hugging Face folder (model + processor)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
