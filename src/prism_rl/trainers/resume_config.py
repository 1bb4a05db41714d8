"""Resuming with other settings than the checkpoint was trained with.

A checkpoint carries the config its run used. ``--resume`` compares it with the config given
now, key by key (dotted names), and sorts each difference:

- **free** (:data:`FREE_KEYS`): keys that cannot change the weights a run ends with (logging,
  checkpoint cadence, periodic evaluation) or change only how the same update is computed, to
  save memory (micro-batch sizes, chunking, gradient checkpointing: the same sums in another
  grouping, so equal up to floating-point rounding). Allowed.
- **length** (:data:`LENGTH_KEYS`: ``train.steps``, ``train.max_steps``, ``train.epochs``):
  extending or shortening a run is free when no learning-rate schedule depends on the run's
  length (``schedule: constant`` with ``warmup_steps`` set or ``warmup_ratio: 0``, as in the
  RL presets); otherwise the remaining learning rates would change, so it is a trajectory change.
- **everything else** (learning rates, batch sizes, seeds, data files, model paths, the
  algorithm and its coefficients, ...) changes the training trajectory: refused with a message
  listing the keys, unless the command was given ``--resume-with-changes``.

``output_dir`` is not compared (the checkpoint was found in it). Whenever anything differs,
the settings used up to the checkpoint are kept in ``config.until-step-<N>.yaml`` and
``config.yaml`` (the new settings) starts with comments saying which steps ran with which file:
the run folder never claims a value the run did not use.

An optimizer's ``state_dict`` holds its hyperparameters and a scheduler's its base learning
rates, so loading them would quietly bring the old learning rate back; after a resume with
changes, :func:`reapply_settings` puts the new config's values (learning rate, betas, eps,
weight decay) back in force. The optimizer moments, RNG states and data position continue from
the checkpoint.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, save_config

log = logging.getLogger(__name__)

RESUME_WITH_CHANGES = "with-changes"   # the ``resume`` value of ``--resume-with-changes``

FREE_KEYS = frozenset({
    "train.log_every", "train.save_every", "train.eval_every", "train.eval_limit", "data.eval",
    "model.gradient_checkpointing", "disc.gradient_checkpointing", "disc.batch_size", "train.logprob_chunk",
    "algo.micro_batch_size", "algo.micro_token_budget", "ppo.micro_batch_size", "ppo.micro_token_budget",
})
LENGTH_KEYS = frozenset({"train.steps", "train.max_steps", "train.epochs"})
_IGNORED = frozenset({"output_dir"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that differs (a key only one side
    has counts, its missing value shown as ``None``)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in _IGNORED and (k not in a or k not in b or a[k] != b[k])}


def length_free(config: dict[str, Any]) -> bool:
    """True when no learning-rate schedule of ``config`` depends on the run's length: every
    optimizer section is ``constant`` with its warm-up given in steps (or none)."""
    sections = [v for v in config.values() if isinstance(v, dict) and "schedule" in v]
    return all(s["schedule"] == "constant" and (s.get("warmup_steps") is not None or not s.get("warmup_ratio"))
               for s in sections)


def with_added_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``defaults``: settings added to prism-rl after
    the checkpoint was written (e.g. ``model.lora``), whose defaults keep the behaviour the run
    had, so they are no change to refuse."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = with_added_defaults(out[k], v)
    return out


def defaults_of(cls) -> dict[str, Any]:
    """The default of every config key that has one (a required key, such as a test config's
    ``output_dir``, is left out), as ``model_dump(mode="json")`` writes values."""
    with warnings.catch_warnings():   # pydantic warns when dumping an unvalidated model
        warnings.simplefilter("ignore")
        return cls.model_construct().model_dump(mode="json")


def trajectory_keys(changes: dict[str, tuple[Any, Any]], new: dict[str, Any]) -> list[str]:
    """The changed keys that change the training trajectory (module docstring)."""
    return [k for k in changes if k not in FREE_KEYS and not (k in LENGTH_KEYS and length_free(new))]


def _show(changes: dict[str, tuple[Any, Any]], keys) -> str:
    return ", ".join(f"{k} {json.dumps(changes[k][0])} -> {json.dumps(changes[k][1])}" for k in keys)


def check_resume_config(cfg, saved: dict[str, Any] | None, ckpt: Path, allow_changes: bool) -> dict:
    """Compare ``cfg`` with the config ``saved`` in checkpoint ``ckpt``; raise
    :class:`~prism_rl.config.ConfigError` on a trajectory change unless ``allow_changes``.
    Returns the changes (``{}`` when the checkpoint holds no config)."""
    if saved is None:
        return {}
    new = cfg.model_dump(mode="json")
    changes = config_changes(with_added_defaults(saved, defaults_of(type(cfg))), new)
    risky = trajectory_keys(changes, new)
    if risky and not allow_changes:
        hint = " (the learning-rate schedule depends on the run's length)" if set(risky) & LENGTH_KEYS else ""
        raise ConfigError(f"--resume: {ckpt.name} was trained with other settings: {_show(changes, risky)}{hint}. "
                          "These change the training trajectory. Resume with the checkpoint's settings (its run's "
                          "config.yaml), continue with the new ones from this step with --resume-with-changes, or "
                          "start over in a new output_dir")
    if changes:
        log.warning("--resume: continuing from %s with changed settings: %s", ckpt.name, _show(changes, changes))
    return changes


def write_run_config(cfg, out: Path, saved: dict[str, Any] | None, step: int | None, changes: dict) -> Path:
    """``config.yaml`` for this invocation (``step``: the checkpoint resumed from, if any). After
    a resume with ``changes`` the settings used up to ``step`` are kept in
    ``config.until-step-<step>.yaml``, and as long as such files exist for the steps already
    run, ``config.yaml`` starts with comments saying which steps ran with which file."""
    path = save_config(cfg, out)
    if step is None:
        return path
    if changes and saved is not None:
        (out / f"config.until-step-{step}.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    ends = sorted(k for p in out.glob("config.until-step-*.yaml")
                  if (k := _int(p.name[len("config.until-step-"):-len(".yaml")])) is not None and k <= step)
    if not ends:
        return path
    head = [f"# settings changed during this run; these apply from step {ends[-1] + 1}"]
    head += [f"# steps {a + 1}-{b} ran with config.until-step-{b}.yaml" for a, b in zip([0, *ends], ends)]
    if changes:
        head.append(f"# changed when resuming at step {step}: {_show(changes, changes)}")
    path.write_text("\n".join(head) + "\n" + path.read_text())
    return path


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def optimizer_settings(stateful: dict[str, Any]) -> dict[str, Any]:
    """What the current config built into ``stateful``'s optimizers (each param group's
    settings) and LR schedulers (base learning rates), before a checkpoint overwrites them."""
    snap: dict[str, Any] = {}
    for key, obj in stateful.items():
        if isinstance(obj, torch.optim.Optimizer):
            snap[key] = [{k: v for k, v in g.items() if k != "params"} for g in obj.param_groups]
        elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
            snap[key] = list(obj.base_lrs)
    return snap


def reapply_settings(stateful: dict[str, Any], snap: dict[str, Any]) -> None:
    """Put the settings of :func:`optimizer_settings` back after ``load_state_dict``: every
    param-group setting but the current ``lr``, the schedulers' base rates, and the current
    rate of a ``LambdaLR`` as ``base_lr * lambda(last_epoch)``, what its next ``step`` would set."""
    for key, obj in stateful.items():
        if isinstance(obj, torch.optim.Optimizer) and key in snap:
            for group, fresh in zip(obj.param_groups, snap[key]):
                group.update({k: v for k, v in fresh.items() if k != "lr"})
    for key, obj in stateful.items():
        if isinstance(obj, torch.optim.lr_scheduler.LRScheduler) and key in snap:
            obj.base_lrs = list(snap[key])
            if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
                lrs = [base * f(obj.last_epoch) for base, f in zip(obj.base_lrs, obj.lr_lambdas)]
                for group, lr in zip(obj.optimizer.param_groups, lrs):
                    group["lr"] = lr
                obj._last_lr = lrs
