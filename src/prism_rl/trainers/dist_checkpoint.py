"""Saving a model sharded with FSDP2: the full weights gathered and written by rank 0.

The exported folder is a plain Hugging Face folder (``from_pretrained`` loads it, with no
trace of the sharding), the same one a single-process run writes. In one process these
functions fall through to :func:`checkpoint.save_final`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed as D
from .checkpoint import save_final as save_final_single


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
    if D.is_main():
        model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)
    D.barrier()
    return folder
