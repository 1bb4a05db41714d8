"""Saving a model sharded with FSDP2: the exported final model, and sharded checkpoints.

The exported folder is a plain Hugging Face folder (``from_pretrained`` loads it, with no
trace of the sharding), the same one a single-process run writes: the full weights are
gathered and rank 0 writes. In one process these functions fall through to
:func:`checkpoint.save_final`.

A checkpoint under torchrun (``checkpoint-<step>/``) is written without gathering anything:

- ``dcp/``: the models and optimizers, every rank writing its own shards with
  ``torch.distributed.checkpoint`` (keyed by parameter name, so another world size reshards
  them on load, and one process loads them as plain tensors);
- ``rng/rank-<r>/``: each rank's RNG states (JSON + safetensors, ``state_io.py``);
- ``trainer_state.*`` (rank 0): schedulers, the data position (global: the same for every
  rank), the run's config, the step and ``world_size``;
- ``manifest.json``, written by rank 0 after every rank has finished (a barrier), then the
  folder is renamed into place, so ``--resume`` never sees a half-written checkpoint.

The ranks must share the output folder's file system (one node, or a shared mount).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..models.lora import is_lora, save_merged
from .checkpoint import check_finite, list_checkpoints, rng_state, set_rng_state
from .checkpoint import save_final as save_final_single
from .manifest import write_manifest
from .state_io import StateFormatError, load_state, save_state

log = logging.getLogger(__name__)


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU, ``{}`` on the other ranks; a
    collective, so every rank must call it. One process: the model's own state dict."""
    if not D.is_distributed():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in tied_aliases(model):  # as model.state_dict() would save them: a tied head is not written
        state.pop(name, None)
    return state


def tied_aliases(model: torch.nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (a tied output head:
    ``lm_head.weight`` is ``embed_tokens.weight``). The gathered state dict holds them as
    separate copies, which ``save_pretrained`` would write twice."""
    seen: set[int] = set()
    aliases = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.append(name)
        seen.add(id(p))
    return aliases


def save_final(folder: Path, model, processor) -> Path:
    """The final model as a plain Hugging Face folder; under FSDP2 the shards are gathered and
    rank 0 writes (every rank calls this, and returns once the folder is complete)."""
    if not D.is_distributed():
        return save_final_single(folder, model, processor)
    state = gather_full_state_dict(model)
    if D.is_main() and is_lora(model):   # the adapter merged into the gathered weights, and saved alone
        save_merged(folder, model, processor, state)
    elif D.is_main():
        model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)
    D.barrier()
    return folder


# ---- sharded checkpoints (torchrun): torch.distributed.checkpoint for weights and optimizers

DCP_DIR = "dcp"          # the sharded weights and optimizer states (``*.distcp`` + ``.metadata``)
RNG_DIR = "rng"          # rng/rank-<r>/trainer_state.{json,safetensors}: each rank's RNG states


def is_sharded(ckpt: Path | None) -> bool:
    """True for a checkpoint written under torchrun (weights in ``dcp/``, not a Hugging Face folder)."""
    return ckpt is not None and (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def optimizer_owners(models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, str]:
    """Optimizer key -> the tracked model whose parameters it updates (DCP names an optimizer's
    states by its model's parameter names, which is what lets another world size load them)."""
    owners = {}
    for key, opt in optimizers.items():
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        match = [name for name, m in models.items() if ids & {id(p) for p in m.parameters()}]
        if len(match) != 1:
            raise ValueError(f"optimizer {key!r} updates parameters of {len(match)} tracked models; a sharded "
                             "checkpoint needs exactly one")
        owners[key] = match[0]
    return owners


def _state(models, optimizers) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    owners = optimizer_owners(models, optimizers)
    return {"model": {name or "root": get_model_state_dict(m) for name, m in models.items()},
            "optim": {key: get_optimizer_state_dict(models[owners[key]], opt) for key, opt in optimizers.items()}}


def save_sharded(folder: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Every rank writes its shards of ``models`` and ``optimizers`` to ``folder/dcp`` (a
    collective). DCP records each tensor's global shape and its pieces, so any world size
    (one process included) can load them back into its own sharding."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(models, optimizers), checkpoint_id=str(Path(folder) / DCP_DIR))


def load_sharded(folder: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Load ``folder/dcp`` into ``models`` and ``optimizers`` as this world size shards them
    (DCP reads the pieces of each tensor this rank holds); one process loads plain tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(models, optimizers)   # the target layout: this rank's shards (optimizer states initialised)
    with warnings.catch_warnings():      # one process: DCP says it assumes a single-process load, which it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(folder) / DCP_DIR))
    owners = optimizer_owners(models, optimizers)
    for name, m in models.items():
        set_model_state_dict(m, state["model"][name or "root"])
    for key, opt in optimizers.items():
        set_optimizer_state_dict(models[owners[key]], opt, state["optim"][key])


def save_checkpoint_sharded(out_dir: str | Path, step: int, models: dict[str, Any], optimizers: dict[str, Any],
                            state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` under torchrun (every rank calls this; the module docstring
    gives the layout). ``state`` is rank 0's trainer state without the optimizers. Refuses
    weights holding NaN/inf, like :func:`checkpoint.save_checkpoint`; keeps the newest ``keep``."""
    bad = [name for name, m in models.items() if not isinstance(m, torch.nn.Module)]
    if bad:
        raise NotImplementedError(f"sharded checkpoints save torch modules; {bad} are not (this stage cannot save a "
                                  "checkpoint under torchrun yet)")
    check_finite(models, f"checkpoint at step {step}")
    out = Path(out_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    save_sharded(tmp, models, optimizers)
    rng_dir = tmp / RNG_DIR / f"rank-{D.rank()}"
    rng_dir.mkdir(parents=True, exist_ok=True)
    save_state(rng_dir, {"rng": rng_state()})
    D.barrier()   # every rank's shards and RNG states are on disk
    if D.is_main():
        save_state(tmp, {**state, "step": step, "rng": rng_state(), "world_size": D.world()})
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def restore_rank_rng(ckpt: Path, fallback: dict[str, Any]) -> None:
    """Set this rank's RNG states from ``rng/rank-<r>``; a rank the checkpoint did not have (it
    was written by fewer processes) takes ``fallback`` (rank 0's states), with a note."""
    folder = Path(ckpt) / RNG_DIR / f"rank-{D.rank()}"
    try:
        set_rng_state(load_state(folder)["rng"])
    except StateFormatError:
        log.info("%s: no RNG states for rank %d (written by fewer processes); using rank 0's", ckpt.name, D.rank())
        set_rng_state(fallback)


def load_full_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a one-process optimizer ``state_dict`` (states keyed by the index of a parameter in
    the optimizer's groups) into ``opt`` of a sharded ``model``: the indices are turned into
    parameter names (the optimizer is built from the same parameters in the same order, and
    FSDP2 keeps their names), then every rank takes its shard of each full state tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    index = [i for g in saved["param_groups"] for i in g["params"]]
    if len(index) != len(names):
        raise ValueError(f"the checkpoint's optimizer updates {len(index)} parameters, this one {len(names)}")
    fqn = dict(zip(index, names))
    full = {"state": {fqn[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
