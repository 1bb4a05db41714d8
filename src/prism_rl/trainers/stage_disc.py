"""The discriminator of the warm-up and alignment stages: loaded (and sharded under torchrun)
and saved, one process or several.

Under ``torchrun`` the discriminator is sharded with FSDP2 like the policy
(``distributed.shard_model``: each backbone decoder layer a unit; the root holds the
embeddings, the vision tower and the value head), so its weights, gradients and AdamW states
are split over the ranks. A sharded checkpoint holds no discriminator folder: the run builds
the discriminator from ``disc.path`` and ``Run.track`` loads the checkpoint's weights into it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed as D
from ..models.discriminator import Discriminator
from .dist_checkpoint import gather_full_state_dict, is_sharded


def load_stage_disc(path: str | Path, device: torch.device, *, resume_from: Path | None = None,
                    gradient_checkpointing: bool = False, cpu_offload: bool = False) -> Discriminator:
    """The trainable (fp32, train-mode) discriminator from ``path`` or, when resuming from a
    one-process checkpoint, from ``resume_from``; sharded under torchrun (weights loaded on the
    CPU first, each rank then keeps its shard; ``cpu_offload``: in host memory)."""
    src = resume_from if resume_from is not None and not is_sharded(resume_from) else path
    disc = Discriminator.load(src, D.load_device(device), dtype=torch.float32,
                              gradient_checkpointing=gradient_checkpointing)
    disc = D.shard_model(disc, device, cpu_offload=cpu_offload)   # cpu_offload: shards in host memory
    disc.train()
    return disc


def save_disc(folder: Path, disc: Discriminator, processor) -> Path:
    """The discriminator as the folder ``prism disc init`` writes; under FSDP2 the shards are
    gathered and rank 0 writes (every rank calls this and returns once the folder is complete)."""
    if not D.is_distributed():
        return disc.save(folder, processor)
    state = gather_full_state_dict(disc)
    if D.is_main():
        disc.save(folder, processor, state=state)
    D.barrier()
    return folder
