"""Checkpoints that resume exactly, are checked before they are trusted, and never hold NaN.

Layout of ``<output_dir>/checkpoint-<step>/``: an ordinary Hugging Face folder (weights +
config + processor files, loadable by ``from_pretrained``; a stage with two models has one
sub-folder each; a LoRA policy's holds its adapter alone, ``models/lora.py``) plus

- ``trainer_state.json`` + ``trainer_state.safetensors`` (``state_io.py``): the optimizers,
  schedulers, RNG states, the data position and the run's config, stored without pickle so
  that resuming from someone else's folder cannot run their code;
- ``manifest.json`` (``manifest.py``): size and SHA-256 of every other file.

``--resume`` takes the newest checkpoint whose files match its manifest and whose state reads
back; a damaged one is passed over with a one-line warning naming what is wrong, and no intact
one is an error. Checkpoints of older versions (a pickled ``trainer_state.pt``) are refused,
never loaded.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.records import DataError
from ..models.lora import is_lora, save_adapter, save_merged
from .manifest import MANIFEST, manifest_problem, write_manifest
from .state_io import STATE_JSON, STATE_TENSORS, StateFormatError, load_state, save_state

log = logging.getLogger(__name__)

LEGACY_STATE = "trainer_state.pt"


class CheckpointError(DataError):
    """No checkpoint ``--resume`` may use; the message names the folder and what is wrong."""


class NonfiniteWeights(FloatingPointError):
    """A model about to be saved (or just loaded) holds NaN or inf."""


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


def nonfinite_tensors(models: dict[str, Any]) -> list[str]:
    """Names (``sub-folder:parameter``) of the parameters of ``models`` holding NaN or inf."""
    bad = []
    for name, model in models.items():
        for pname, p in getattr(model, "named_parameters", lambda: [])():
            if not bool(torch.isfinite(p.detach()).all()):
                bad.append(f"{name}:{pname}" if name else pname)
    return bad


def check_finite(models: dict[str, Any], when: str) -> None:
    """Raise :class:`NonfiniteWeights` naming the first parameters of ``models`` that hold NaN/inf."""
    bad = nonfinite_tensors(models)
    if bad:
        raise NonfiniteWeights(f"{when}: {len(bad)} weight tensors hold NaN or inf (e.g. {', '.join(bad[:3])}), so "
                               "they were not saved; the run diverged or its inputs hold inf/NaN (resume from the "
                               "last checkpoint with a lower learning rate, or check the data)")


def save_checkpoint(out_dir: str | Path, step: int, models: dict[str, Any], processor,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Save ``models`` (name -> model; "" means the folder itself), the trainer state and the
    manifest. Refuses (:class:`NonfiniteWeights`) weights holding NaN/inf, which would poison
    every resume.

    Writes to a temporary folder and renames it, so a crash mid-save never leaves a
    half-written checkpoint that ``--resume`` would pick up. Keeps the newest ``keep``.
    """
    check_finite(models, f"checkpoint at step {step}")
    out = Path(out_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        target = tmp / name if name else tmp
        # a LoRA policy: the adapter alone (the frozen base is model.path); HF models have
        # save_pretrained; the discriminator saves backbone + value head itself
        save = (partial(save_adapter, model=model) if is_lora(model)
                else getattr(model, "save_pretrained", None) or model.save)
        save(target)
        if processor is not None:
            processor.save_pretrained(target)
    save_state(tmp, {**state, "step": step, "rng": rng_state()})
    write_manifest(tmp)
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
    """The ``checkpoint-<step>`` folders of a run that hold anything (intact or not), oldest
    first; an empty one is a save that never started and is left out."""
    found = [(step, p) for p in Path(out_dir).glob("checkpoint-*")
             if (step := checkpoint_step(p)) is not None and p.is_dir() and any(p.iterdir())]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt`` after checking its files against the manifest; raises
    :class:`CheckpointError` saying what is wrong (an old pickled state is refused unread)."""
    if _legacy(ckpt):
        raise CheckpointError(f"{ckpt / LEGACY_STATE}: a checkpoint of an older prism-rl, whose trainer state is a "
                              "pickle; --resume does not load pickles (unpickling runs code from the file). Continue "
                              "that run with the prism-rl version that wrote it, or start over in a new output_dir")
    problem = manifest_problem(ckpt)
    if problem is None and not {STATE_JSON, STATE_TENSORS} <= _listed(ckpt):
        problem = f"{MANIFEST} does not list the trainer state"
    if problem is None:
        try:
            return load_state(ckpt)
        except StateFormatError as e:
            problem = str(e)
    raise CheckpointError(f"{ckpt} is damaged: {problem}")


def _legacy(ckpt: Path) -> bool:
    return (ckpt / LEGACY_STATE).exists() and not (ckpt / STATE_JSON).exists()


def _listed(ckpt: Path) -> set[str]:
    return set(json.loads((ckpt / MANIFEST).read_text())["files"])


def resume_checkpoint(out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of ``out_dir`` and its trainer state; ``None`` when there
    is no checkpoint at all. Damaged newer ones are passed over with one warning line naming
    what is wrong; none intact raises :class:`CheckpointError` listing each one's problem."""
    problems = []
    for ckpt in reversed(list_checkpoints(out_dir)):
        try:
            state = read_checkpoint(ckpt)
        except CheckpointError as e:
            if _legacy(ckpt):
                raise
            problems.append(str(e))
            continue
        if problems:
            log.warning("--resume: %s; resuming from %s", "; ".join(problems), ckpt.name)
        return ckpt, state
    if problems:
        raise CheckpointError(f"--resume: no intact checkpoint in {out_dir}: {'; '.join(problems)}. Start over in a "
                              "new output_dir, or restore a checkpoint folder from a copy")
    return None


def save_final(folder: Path, model, processor) -> Path:
    """The final model as a plain Hugging Face folder (model + processor); a LoRA policy's with
    the adapter merged into the weights, and the adapter alone in ``adapter/`` (``models/lora.py``)."""
    if is_lora(model):
        return save_merged(folder, model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
