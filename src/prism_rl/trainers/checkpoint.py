"""Checkpoints that resume exactly, and the final model folder.

Layout of ``<output_dir>/checkpoint-<step>/``: an ordinary Hugging Face folder (weights +
config + processor files, loadable by ``from_pretrained``; a stage with two models has one
sub-folder each) plus ``trainer_state.pt`` holding the optimizers, schedulers, RNG states and
the data position, so that ``--resume`` continues where the run stopped.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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
    """Save ``models`` (name -> model; "" means the folder itself) and the trainer state.

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
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder; ``None`` for any other folder."""
    m = re.fullmatch(r"checkpoint-(\d+)", Path(folder).name)
    return int(m.group(1)) if m else None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    found = [(step, p) for p in Path(out_dir).glob("checkpoint-*")
             if (step := checkpoint_step(p)) is not None and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def save_final(folder: Path, model, processor) -> Path:
    """The final model as a plain Hugging Face folder (model + processor)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
