"""The run loop every trainer shares: start, resume, step, log, time, save, stop.

A stage builds its models and optimizers, then hands a :class:`Run` what a checkpoint holds
and loops over :meth:`Run.steps`::

    run = Run(cfg, "rl", resume=resume)                    # config written, seeded, device picked
    model, processor = load_stage_policy(cfg, run.device, run.ckpt)
    ...
    saved = run.track({"": model}, processor, {"optimizer": opt, "scheduler": sched},
                      extra=lambda: {"stream": stream.state()})   # restores them when resuming
    run.begin(total=cfg.train.steps, halt_at_step=halt_at_step, prompts=len(pool))
    with run:                                              # Ctrl-C saves a checkpoint
        for step in run.steps():                           # bar, save_every
            with run.timer("rollout"):
                ...
            run.log(step, {"actor/pg_loss": ..., **run.timings()})
    return run.finish(lambda folder: save_final(folder, model, processor), summary={...})

Metric names are namespaced as in verl and EasyR1: ``actor/`` (policy update), ``disc/``
(discriminator), ``rollout/`` (what was sampled and how it scored), ``timing/`` (seconds and
throughput), ``eval/`` (held-out), ``train/`` (progress counters); the same quantity has the
same name in every stage. Rows with an ``event`` key (start, end) are not metrics.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import save_config
from ..data.images import configure_images
from ..models.loading import load_policy, pick_device, set_pixel_limits
from .checkpoint import checkpoint_step, latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def outcome(folder: Path, finished: str) -> str:
    """The line a stage's command prints about the folder its run returned.

    :meth:`Run.finish` returns a ``checkpoint-<N>`` folder when the run halted before its last
    step (``--halt-at-step``) and the final folder otherwise; only the latter is a final model,
    so a halted run says ``stopped at step N, checkpoint: ...`` and how to continue.
    """
    step = checkpoint_step(folder)
    if step is None and folder.name == "policy":  # alignment returns the policy sub-folder
        step = checkpoint_step(folder.parent)
    if step is None:
        return f"{finished}: {folder}"
    return f"stopped at step {step}, checkpoint: {folder} (continue with --resume)"


def load_stage_policy(cfg, device: torch.device, resume_from: Path | None = None):
    """The stage's trainable policy and processor: from ``cfg.model`` or, when resuming, from
    the checkpoint folder ``resume_from``; the processor gets ``cfg.data``'s pixel limits, the
    image decoder its size limits."""
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"path": str(resume_from)})
    model, processor = load_policy(model_cfg, device, trainable=True)
    set_pixel_limits(processor, cfg.data.max_pixels, cfg.data.min_pixels)
    configure_images(cfg.data)
    return model, processor


class Run:
    """One training run: output folder, config, seed, device, checkpoints, metrics, timers.

    ``cfg`` needs ``output_dir``, ``train.seed``, ``train.log_every`` and may have
    ``train.save_every``. Checkpoints are written every ``save_every`` steps, on Ctrl-C inside
    ``with run:`` and when the run halts before its last step (``halt_at_step``).
    """

    def __init__(self, cfg, stage: str, *, resume: bool = False, desc: str | None = None):
        self.cfg, self.stage, self.desc = cfg, stage, desc or stage
        self.out = Path(cfg.output_dir)
        save_config(cfg, self.out)
        seed_everything(cfg.train.seed)
        self.device = pick_device()
        self.ckpt = latest_checkpoint(self.out) if resume else None
        if resume and self.ckpt is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.out)
        self.step = 0
        self.total = self.halt = 0
        self.save_every = getattr(cfg.train, "save_every", None)
        self._models: dict[str, Any] = {}
        self._processor = None
        self._stateful: dict[str, Any] = {}
        self._extra: Callable[[], dict] = dict
        self._times: dict[str, float] = {}
        self.logger: MetricsLogger | None = None
        self.bar: tqdm | None = None

    # ---- set-up

    def track(self, models: dict[str, Any], processor, stateful: dict[str, Any],
              extra: Callable[[], dict] = dict) -> dict:
        """Say what a checkpoint holds: ``models`` (sub-folder -> model, "" = the folder itself),
        the processor, objects with ``state_dict``/``load_state_dict`` (optimizers, schedulers)
        and ``extra()`` (data position, ...). When resuming, restores the objects, the RNG
        states and the step count, and returns the saved state (``{}`` on a fresh start) for
        the stage to read its ``extra`` keys from."""
        self._models, self._processor, self._stateful, self._extra = models, processor, stateful, extra
        if self.ckpt is None:
            return {}
        st = load_trainer_state(self.ckpt)
        for key, obj in stateful.items():
            obj.load_state_dict(st[key])
        set_rng_state(st["rng"])
        self.step = st["step"]
        return st

    def begin(self, total: int, halt_at_step: int | None = None, **start_info: Any) -> None:
        """Open the metrics log with a start event, and the progress bar."""
        self.total = total
        self.halt = total if halt_at_step is None else min(total, halt_at_step)
        self.logger = MetricsLogger(self.out)
        self.logger.log(self.step, {"event": "start", "stage": self.stage, **start_info,
                                    "resumed_from": str(self.ckpt) if self.ckpt else None})
        self.bar = tqdm(total=total, initial=self.step, desc=self.desc, dynamic_ncols=True)

    # ---- the loop

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is KeyboardInterrupt:
                path = self.save()
                log.warning("interrupted: checkpoint saved to %s; continue with --resume", path)
        finally:
            self.close()

    def steps(self) -> Iterator[int]:
        """Yield the number of each step to run (1-based) until the halt; after each step,
        count it, advance the bar and save every ``save_every`` steps (not at the last)."""
        while self.step < self.halt:
            yield self.step + 1
            self.step += 1
            self.bar.update(1)
            if self.save_every and self.step % self.save_every == 0 and self.step < self.total:
                self.save()

    def log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.halt

    def log(self, step: int, metrics: dict[str, Any], *, force: bool = False) -> None:
        """Write ``metrics`` for ``step`` when logging is due (every ``log_every`` and at the halt)."""
        if force or self.log_due(step):
            self.logger.log(step, metrics)

    def show(self, **values: float) -> None:
        """Put ``values`` beside the progress bar."""
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the block's wall time to ``timing/<name>_s`` of the step's :meth:`timings`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - t

    def timings(self) -> dict[str, float]:
        """The timers of this step as ``timing/<name>_s`` metrics; resets them."""
        out = {f"timing/{k}_s": v for k, v in self._times.items()}
        self._times = {}
        return out

    # ---- saving

    def state(self) -> dict:
        return {key: obj.state_dict() for key, obj in self._stateful.items()} | self._extra()

    def save(self) -> Path:
        """A resumable checkpoint at the current step."""
        return save_checkpoint(self.out, self.step, self._models, self._processor, self.state())

    def finish(self, save_final: Callable[[Path], Path], summary: dict) -> Path:
        """End the run: halted early, a checkpoint to resume from; done, ``save_final(out /
        "final")`` and ``summary.json``. Returns the folder written."""
        self.close()
        if self.step < self.total:
            return self.save()
        final = save_final(self.out / "final")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return final

    def close(self) -> None:
        """Close the progress bar and the metrics log (again is harmless)."""
        for c in (self.bar, self.logger):
            if c is not None:
                c.close()
        self.bar = self.logger = None
