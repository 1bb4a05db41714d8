"""The run loop every trainer shares: start, resume, step, log, time, save, stop.

A stage builds its models and optimizers, then hands a :class:`Run` what a checkpoint holds
and loops over :meth:`Run.steps`::

    run = Run(cfg, "rl", resume=resume)                    # config written, seeded, device picked
    model, processor = load_stage_policy(cfg, run.device, run.ckpt)
    ...
    saved = run.track({"": model}, processor, {"optimizer": opt, "scheduler": sched},
                      extra=lambda: {"stream": stream.state()})   # restores them when resuming
    run.begin(total=cfg.train.steps, halt_at_step=halt_at_step, prompts=len(pool))
    with run:                                              # SIGTERM / SIGINT: stop after the step
        for step in run.steps():                           # bar, save_every
            with run.timer("rollout"):
                ...
            run.log(step, {"actor/pg_loss": ..., **run.timings()})
        return run.finish(lambda folder: save_final(folder, model, processor), summary={...})

A first SIGTERM or SIGINT inside ``with run:`` lets the step in progress finish, then the loop
ends and :meth:`Run.finish` saves a checkpoint at that step (``interrupt.py`` says why a step is
finished rather than abandoned); a second one raises :class:`~.interrupt.Abort` at once.

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

from .. import distributed as D
from ..config import ConfigError, LoraConfig
from ..data.images import configure_images
from ..data.records import DataError
from ..models.loading import load_policy, set_pixel_limits
from ..models.lora import add_lora, holds_adapter, load_adapter
from .checkpoint import (
    check_finite,
    checkpoint_step,
    nonfinite_tensors,
    resume_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .dist_checkpoint import (
    is_sharded,
    load_full_optimizer,
    load_sharded,
    optimizer_owners,
    restore_rank_rng,
    save_checkpoint_sharded,
)
from .interrupt import StopSignals, record_stop
from .resume_config import RESUME_WITH_CHANGES, check_resume_config, optimizer_settings, reapply_settings, write_run_config
from .state_io import load_state

log = logging.getLogger(__name__)


def same_global_batch(saved: dict | None, saved_world: int, world: int) -> dict | None:
    """The checkpoint's config as this world size would say it: when the run continues on
    another number of processes with the same global batch (``train.grad_accum x world``
    equal), the saved ``grad_accum`` is taken as the current one, so the resume check does
    not call it a change; a different global batch stays one."""
    train = (saved or {}).get("train")
    if not isinstance(train, dict) or saved_world == world or not isinstance(train.get("grad_accum"), int):
        return saved
    total = train["grad_accum"] * saved_world
    if total % world:
        return saved
    return {**saved, "train": {**train, "grad_accum": total // world}}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and to TensorBoard.

    A run that starts at ``start_step`` (a resumed one) first drops the rows of later steps
    from both: they were logged by an earlier attempt that died after its last checkpoint, and
    the steps are run (and logged) again, so each step appears once.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, start_step: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        drop_rows_after(self.path, start_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard hides the events of steps >= it from earlier writers
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=start_step + 1)
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


class _NoLogger:
    """The metrics log of ranks other than 0 under torchrun: nothing is written."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite ``path`` (a ``metrics.jsonl``) without the rows of steps after ``step`` and
    without a torn last line (a process killed mid-write); returns how many lines went."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        log.info("%s: dropped %d rows past step %d (logged before the last checkpoint was resumed)",
                 path, len(lines) - len(kept), step)
    return len(lines) - len(kept)


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def outcome(folder: Path, finished: str, stopped_by: str | None = None) -> str:
    """The line a stage's command prints about the folder its run returned.

    :meth:`Run.finish` returns a ``checkpoint-<N>`` folder when the run halted before its last
    step (``--halt-at-step``, or a signal: ``stopped_by``) and the final folder otherwise; only
    the latter is a final model, so a halted run says ``stopped at step N, checkpoint: ...``
    (``stopped by SIGTERM after step N, ...``) and how to continue.
    """
    step = checkpoint_step(folder)
    if step is None and folder.name == "policy":  # alignment returns the policy sub-folder
        step = checkpoint_step(folder.parent)
    if step is None:
        return f"{finished}: {folder}"
    how = f"stopped by {stopped_by} after step" if stopped_by else "stopped at step"
    return f"{how} {step}, checkpoint: {folder} (continue with --resume)"


def check_cpu_offload(section, name: str = "model") -> None:
    """``<name>.cpu_offload`` moves FSDP2 shards to host memory; one process shards nothing, so
    the setting would do nothing there: an error rather than a silently ignored setting."""
    if section.cpu_offload and not D.is_distributed():
        raise ConfigError(f"{name}.cpu_offload=true applies only under torchrun (it offloads the FSDP2 shards of a "
                          f"distributed run); one process holds no shards: set {name}.cpu_offload=false or launch "
                          "with torchrun --nproc-per-node N")


def stage_rollout_model(cfg, model, device: torch.device):
    """The model a stage's rollout engine samples: the policy itself in one process; under
    torchrun an unsharded copy with the same LoRA layers (``distributed.rollout_model``),
    refreshed from the shards after each update by ``distributed.sync_weights``."""
    return D.rollout_model(model, lambda: add_lora(load_policy(cfg.model, device, trainable=False)[0],
                                                   cfg.model.lora))


def load_stage_policy(cfg, device: torch.device, resume_from: Path | None = None):
    """The stage's trainable policy and processor: from ``cfg.model`` or, when resuming, from
    the checkpoint folder ``resume_from``; with ``cfg.model.lora`` LoRA adapters are injected
    (``models/lora.py``) and, from a LoRA checkpoint (the adapter alone), the frozen base comes
    from ``cfg.model.path`` and the adapter from the checkpoint. The processor gets
    ``cfg.data``'s pixel limits, the image decoder its size limits."""
    # a sharded (torchrun) checkpoint holds no Hugging Face folder: build from cfg.model, then
    # Run.track loads the checkpoint's weights (adapters and frozen base) into the (re)sharded model
    lora = getattr(cfg.model, "lora", LoraConfig())
    from_ckpt = resume_from is not None and not is_sharded(resume_from)
    adapter_ckpt = from_ckpt and holds_adapter(resume_from)
    if adapter_ckpt and not lora.enabled:
        raise ConfigError(f"{resume_from} holds a LoRA adapter, not full weights: resume it with the model.lora "
                          "settings it was trained with (model.lora.r > 0)")
    full = from_ckpt and not adapter_ckpt
    model_cfg = cfg.model.model_copy(update={"path": str(resume_from)}) if full else cfg.model
    model, processor = load_policy(model_cfg, D.load_device(device), trainable=True)
    model = add_lora(model, lora, model_cfg.path)
    if adapter_ckpt:
        load_adapter(model, resume_from)
    check_cpu_offload(cfg.model)
    model = D.shard_model(model, device, cpu_offload=cfg.model.cpu_offload)  # distributed: FSDP2 shards; one process: unchanged
    set_pixel_limits(processor, cfg.data.max_pixels, cfg.data.min_pixels)
    configure_images(cfg.data)
    return model, processor


class Run:
    """One training run: output folder, config, seed, device, checkpoints, metrics, timers.

    ``cfg`` needs ``output_dir``, ``train.seed``, ``train.log_every`` and may have
    ``train.save_every``. Checkpoints are written every ``save_every`` steps and when the run
    stops before its last step: at ``halt_at_step``, or after the step in progress when SIGTERM
    or SIGINT arrives inside ``with run:``.
    """

    def __init__(self, cfg, stage: str, *, resume: bool | str = False, desc: str | None = None):
        """``resume``: ``True`` continues from the newest intact checkpoint (refusing settings
        that change the training trajectory, ``resume_config.py``); ``"with-changes"``
        (:data:`RESUME_WITH_CHANGES`) accepts them."""
        self.cfg, self.stage, self.desc = cfg, stage, desc or stage
        self.out = Path(cfg.output_dir)
        self.device = D.init_from_env()  # distributed: joins the torchrun group, this rank's device
        self.ckpt, self._resume_state, self.config_changes = self._resume_point(resume)
        if D.is_main():  # distributed: rank 0 writes the run's files
            write_run_config(cfg, self.out, self._resume_state and self._resume_state.get("run_config"),
                             self._resume_state["step"] if self._resume_state else None, self.config_changes)
        seed_everything(cfg.train.seed)
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
        self._signals: StopSignals | None = None
        self._in_step = False
        self._peer_stop: str | None = None
        self._last_saved = self.ckpt   # the newest checkpoint of this run (written, or resumed from)
        record_stop(None)

    def _resume_point(self, resume: bool | str) -> tuple[Path | None, dict | None, dict]:
        """(checkpoint, its trainer state, the config changes allowed) to resume from; Nones
        and ``{}`` on a fresh start (or when there is no checkpoint yet)."""
        found = self._find_checkpoint() if resume else None
        if found is None:
            if resume:
                log.warning("--resume: no checkpoint in %s, starting from scratch", self.out)
            return None, None, {}
        ckpt, state = found
        saved = same_global_batch(state.get("run_config"), state.get("world_size", 1), D.world())
        return ckpt, state, check_resume_config(self.cfg, saved, ckpt, resume == RESUME_WITH_CHANGES)

    def _find_checkpoint(self) -> tuple[Path, dict] | None:
        """:func:`resume_checkpoint`; under torchrun rank 0 checks the manifest (one read of the
        checkpoint, not one per rank) and sends the folder's name, which the other ranks read
        the trainer state of (a large one-process optimizer state is not sent over the group)."""
        mine: list = []

        def check() -> str | None:
            mine.append(resume_checkpoint(self.out))
            return mine[0][0].name if mine[0] else None

        name = D.from_main(check)
        if name is None:
            return None
        return mine[0] if mine else (self.out / name, load_state(self.out / name))

    # ---- set-up

    def track(self, models: dict[str, Any], processor, stateful: dict[str, Any],
              extra: Callable[[], dict] = dict) -> dict:
        """Say what a checkpoint holds: ``models`` (sub-folder -> model, "" = the folder itself),
        the processor, objects with ``state_dict``/``load_state_dict`` (optimizers, schedulers)
        and ``extra()`` (data position, ...). When resuming, restores the objects, the RNG
        states and the step count, and returns the saved state (``{}`` on a fresh start) for
        the stage to read its ``extra`` keys from."""
        self._models, self._processor, self._stateful, self._extra = models, processor, stateful, extra
        bad = nonfinite_tensors(models)
        if bad:
            where = f"checkpoint {self.ckpt}" if self.ckpt else "the model folder this run starts from"
            raise DataError(f"{where}: {len(bad)} weight tensors hold NaN or inf (e.g. {', '.join(bad[:3])}); "
                            "the weights are damaged")
        if self.ckpt is None:
            return {}
        st = self._resume_state
        built = optimizer_settings(stateful)
        sharded = is_sharded(self.ckpt)
        to_shard = D.is_distributed() and not sharded   # a one-process checkpoint resumed under torchrun
        optimizers = {k: o for k, o in stateful.items() if isinstance(o, torch.optim.Optimizer) and (sharded or to_shard)}
        for key, obj in stateful.items():
            if key not in optimizers:
                obj.load_state_dict(st[key])
        if sharded:   # weights and optimizer states from dcp/, resharded to this world size
            load_sharded(self.ckpt, models, optimizers)
        for key, opt in optimizers.items() if to_shard else ():   # the weights came from the folder itself
            load_full_optimizer(models[optimizer_owners(models, {key: opt})[key]], opt, st[key])
        if self.config_changes:   # the new learning rate etc. apply, not the checkpoint's
            reapply_settings(stateful, built)
        if sharded:
            restore_rank_rng(self.ckpt, st["rng"])
        else:
            set_rng_state(st["rng"])
        self.step = st["step"]
        return st

    def begin(self, total: int, halt_at_step: int | None = None, **start_info: Any) -> None:
        """Open the metrics log with a start event, and the progress bar."""
        self.total = total
        self.halt = total if halt_at_step is None else min(total, halt_at_step)
        self.logger = (MetricsLogger(self.out, start_step=self.step) if D.is_main()
                       else _NoLogger())  # distributed: rank 0 logs
        self.logger.log(self.step, {"event": "start", "stage": self.stage, **start_info,
                                    "resumed_from": str(self.ckpt) if self.ckpt else None})
        self.bar = tqdm(total=total, initial=self.step, desc=self.desc, dynamic_ncols=True, disable=not D.is_main())

    # ---- the loop

    def __enter__(self) -> Run:
        """Catch SIGTERM and SIGINT until the block ends (``interrupt.StopSignals``)."""
        self._signals = StopSignals(self._notice, self._abort_message).__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Put the previous signal handlers back and close the log. Nothing is saved on an
        exception: the step it broke off is half-applied (the newest checkpoint stays the
        one to resume from)."""
        try:
            if self._signals is not None:
                self._signals.__exit__()
        finally:
            self.close()

    @property
    def stop_requested(self) -> str | None:
        """The signal that asked this run to stop, if one has."""
        return self._signals.received if self._signals is not None else None

    @property
    def stopped_by(self) -> str | None:
        """The signal that stopped the run before its halt (``None``: it was not stopped)."""
        return (self.stop_requested or self._peer_stop) if self.step < self.halt else None

    def _stop_agreed(self) -> bool:
        """Whether to stop before the next step. Under torchrun the ranks decide together (a max
        over ranks, one tiny all-reduce per step): a signal reaching the ranks between two
        different steps would otherwise let one rank leave the loop while the others wait in
        the next step's collectives (a hang). A rank stopped by another's signal says so."""
        mine = self.stop_requested is not None
        if not D.is_distributed():
            return mine
        if D.all_reduce_max(float(mine))[0] > 0 and not mine:
            self._peer_stop = "a signal to another rank"
        return mine or self._peer_stop is not None

    def _notice(self, name: str) -> str:
        doing = f"finishing step {self.step + 1}, then saving" if self._in_step else "saving"
        since = self._last_saved.name if self._last_saved is not None else "the start"
        return (f"{self.desc}: {name} received: {doing} a checkpoint and stopping "
                f"(a second signal stops at once, losing the steps since {since})")

    def _abort_message(self, name: str) -> str:
        where = f"in step {self.step + 1}" if self._in_step else f"after step {self.step}"
        since = f"{self._last_saved} (continue with --resume)" if self._last_saved is not None else "the start (no checkpoint)"
        return f"stopped at once by a second {name} {where}; nothing saved since {since}"

    def steps(self) -> Iterator[int]:
        """Yield the number of each step to run (1-based) until the halt, or until a stop
        signal has come; after each step, count it, advance the bar and save every
        ``save_every`` steps (not at the last)."""
        while self.step < self.halt and not self._stop_agreed():
            self._in_step = True
            yield self.step + 1
            self._in_step = False
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
        """The timers of this step as ``timing/<name>_s`` metrics, and on a GPU this process's
        peak memory since the last call (``memory/peak_gib``: allocated by tensors;
        ``memory/reserved_gib``: held by PyTorch's caching allocator, what the card sees); resets them."""
        out = {f"timing/{k}_s": v for k, v in self._times.items()}
        self._times = {}
        if self.device.type == "cuda":
            out["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["memory/reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    # ---- saving

    def state(self, skip: tuple[str, ...] = ()) -> dict:
        return ({key: obj.state_dict() for key, obj in self._stateful.items() if key not in skip} | self._extra()
                | {"run_config": self.cfg.model_dump(mode="json")})

    def save(self) -> Path:
        """A resumable checkpoint at the current step: under torchrun a sharded one
        (``dist_checkpoint.save_checkpoint_sharded``, every rank takes part), else a Hugging Face
        folder with the trainer state (``checkpoint.save_checkpoint``)."""
        if D.is_distributed():
            optimizers = {k: o for k, o in self._stateful.items() if isinstance(o, torch.optim.Optimizer)}
            self._last_saved = save_checkpoint_sharded(self.out, self.step, self._models, optimizers,
                                                       self.state(skip=tuple(optimizers)))
        else:
            self._last_saved = save_checkpoint(self.out, self.step, self._models, self._processor, self.state())
        return self._last_saved

    def finish(self, save_final: Callable[[Path], Path], summary: dict) -> Path:
        """End the run: halted or stopped by a signal early, a checkpoint to resume from (the
        one just written at this step, if any); done, ``save_final(out / "final")`` and
        ``summary.json``. Returns the folder written. Call it inside ``with run:``, so that a
        second signal still stops a slow save at once."""
        record_stop(self.stopped_by)
        if self.stopped_by and self.logger is not None:
            self.logger.log(self.step, {"event": "stop", "signal": self.stopped_by})
        self.close()
        if self.step < self.total:
            done = (self._last_saved is not None and checkpoint_step(self._last_saved) == self.step
                    and self._last_saved.exists())
            return self._last_saved if done else self.save()
        check_finite(self._models, "final model")
        final = save_final(self.out / "final")
        if D.is_main():
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return final

    def close(self) -> None:
        """Close the progress bar and the metrics log (again is harmless)."""
        for c in (self.bar, self.logger):
            if c is not None:
                c.close()
        self.bar = self.logger = None
