"""Data parallelism with FSDP2 under ``torchrun``: process group, ranks, sharding, global sums.

One process (``prism sft ...``) is world size 1 and every helper here is a no-op, so the
trainers run one code path. Under ``torchrun --nproc-per-node N`` (or ``--nnodes M`` with a
rendezvous endpoint) each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins the process
group (NCCL on GPUs, gloo on the CPU), takes its share of every global batch and shards the
model with PyTorch's ``fully_shard`` (each decoder layer and vision block its own unit, then
the root), so a rank holds 1/N of the parameters, gradients and AdamW states.

Why the helpers exist: a loss that is a mean over a batch (token-mean SFT, the PPO
token-mean) must divide by the count over the *global* batch, not the rank's share, or the
update would depend on the number of GPUs; :func:`all_reduce_sum` gives that count.
FSDP2 averages gradients over ranks (sum / N), so a rank's loss is multiplied by
:func:`grad_scale` (= N) to turn that average back into the sum the global mean needs.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import types
import warnings
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> torch.device:
    """Join the process group when launched by ``torchrun`` (once), and return this rank's
    device: ``cuda:LOCAL_RANK`` (set as the current device) or the CPU. One process: no
    group, ``cuda`` when there is a GPU, else the CPU."""
    cuda = torch.cuda.is_available()
    if not launched():
        return torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 writes the run's files (config, metrics, summary, exported model)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_main(compute):
    """``compute()`` run on rank 0 only, its result (or the exception it raised) given to every
    rank: work every rank would repeat, such as hashing a checkpoint before trusting it. The
    result travels as ``broadcast_object_list`` sends it, between the processes of one job.
    One process: ``compute()``."""
    if not is_distributed():
        return compute()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", compute())
        except Exception as e:  # raised on every rank below, so none waits for the others
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def grad_scale() -> int:
    """Factor on a rank's loss so FSDP2's gradient average over N ranks becomes their sum."""
    return world()


def _reduce(values: Sequence[float], op) -> list[float]:
    if not is_distributed():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(*values: float) -> list[float]:
    """Sum of each value over ranks (float64, so token counts stay exact)."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(*values: float) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX)


def gather_rows(local: torch.Tensor, rows: Sequence[int], total: int) -> torch.Tensor:
    """The (total, ...) table whose rows ``rows`` this rank computed (``local``, one row each)
    and the other ranks the rest, on every rank: each rank writes its rows into zeros and the
    tables are summed over ranks (float64, so every entry is one rank's value exactly). Each row
    must belong to exactly one rank. Used for metrics of a global batch that the ranks hold
    whole groups of (means over it then equal the one-process means). Returned on the CPU."""
    table = torch.zeros((total, *local.shape[1:]), dtype=torch.float64)
    if len(rows):
        table[torch.as_tensor(list(rows), dtype=torch.long)] = local.detach().to("cpu", torch.float64)
    if is_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else table.device
        t = table.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        table = t.cpu()
    return table


def balanced_shares(costs: Sequence[float], n: int) -> list[list[int]]:
    """Split items (micro-batches, prompt groups) into ``n`` shares of equal count, balanced by cost.

    Items go in descending cost, in rounds of ``n``; round k gives its items to the shares in
    the order of their current total cost, smallest first (largest item to the lightest
    share). Every share gets len(costs) / n items (a remainder is an error: the ranks must run
    the same number of forwards, which are collective under FSDP2); each share is returned in
    ascending item order. Deterministic, so every rank computes the same split.
    """
    if len(costs) % n:
        raise ValueError(f"{len(costs)} items do not split evenly over {n} ranks")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    shares: list[list[int]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for s in range(0, len(order), n):
        lightest = sorted(range(n), key=lambda r: (totals[r], r))
        for r, i in zip(lightest, order[s:s + n]):
            shares[r].append(i)
            totals[r] += costs[i]
    return [sorted(s) for s in shares]


def my_share(costs: Sequence[float]) -> list[int]:
    """This rank's indices of :func:`balanced_shares` (all of them in one process)."""
    return balanced_shares(costs, world())[rank()]


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sub-modules FSDP2 shards as separate units: instances of the classes the model lists
    in ``_no_split_modules`` outside the vision tower (Qwen3-VL: its text decoder layers). Each
    unit's parameters are all-gathered just before its forward and freed after, so peak memory
    holds one layer's full weights, not the model's.

    The vision tower stays in the root unit: a rank whose micro-batch holds no image skips it,
    and per-block units would then make the ranks' all-gathers differ (a hang); in the root it
    is gathered once per forward with the embeddings (about 0.4B parameters for Qwen3-VL 4B/8B).
    """
    hf = _hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    visual = getattr(getattr(hf, "model", hf), "visual", None)
    in_vision = {id(m) for m in visual.modules()} if visual is not None else set()
    return [m for m in model.modules() if type(m).__name__ in names and m is not model and id(m) not in in_vision]


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model that names the shard units: the model itself, or the ``backbone``
    of a wrapper such as the discriminator (a Qwen3-VL(-MoE) model plus a value head; the head
    then sits in the root unit with the embeddings)."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, torch.nn.Module) and not hasattr(model, "_no_split_modules") else model


def shard_model(model: torch.nn.Module, device: torch.device, *, cpu_offload: bool = False) -> torch.nn.Module:
    """``fully_shard`` each unit of :func:`shard_units`, then the root (embeddings, head, norms).

    On CUDA: bf16 parameters for compute, fp32 gradient reduction (``MixedPrecisionPolicy``);
    the sharded fp32 master copy is what AdamW updates. On the CPU (gloo, tests) everything
    stays fp32. ``cpu_offload`` keeps the shards and optimizer states in host memory. One
    process: the model is returned unchanged (already on ``device``).
    """
    if not is_distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world(),))
    kw: dict = {"mesh": mesh}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")  # pinning needs a CUDA driver
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=True, **kw)
    # the root (embeddings, tied output head, final norm) stays gathered from its forward to its
    # backward, so the head the loss applies after the backbone sees full weights
    fully_shard(model, reshard_after_forward=False, **kw)
    # a rank without images leaves the vision tower's gradients empty: reduce zeros for them so
    # every rank's reduce-scatter has the same size (torch >= 2.14; before, freeze the tower)
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
    elif any(p.requires_grad for p in vision_params(model)):
        log.warning("torch %s cannot reduce unused gradients under FSDP2: a micro-batch with images on one rank and "
                    "none on another would hang; set model.freeze_vision=true or use torch >= 2.14", torch.__version__)
    # FSDP2 warns that the root's output is a view (an in-place op on it would skip a hook); the
    # trainers never modify hidden states in place, so the warning would only add noise per step
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if hasattr(model, "model"):  # the trainers call the backbone, not model.forward: route it through the root's hooks
        model.backbone_forward = types.MethodType(_backbone_forward, model)
        register_fsdp_forward_method(model, "backbone_forward")
    if vision_owner(model) is not None:  # the tower alone, for models/shared_vision.py: also through the root's hooks
        model.vision_features = types.MethodType(vision_features, model)
        register_fsdp_forward_method(model, "vision_features")
    return model


def vision_owner(model) -> torch.nn.Module | None:
    """The module that owns the vision tower as a child named ``visual`` and has
    ``get_image_features`` (``Qwen3VLModel``, also under a PEFT or FSDP2 wrapper), or None."""
    for m in model.modules():
        if "visual" in m._modules and callable(getattr(m, "get_image_features", None)):
            return m
    return None


def vision_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    hf = _hf_model(model)
    visual = getattr(getattr(hf, "model", hf), "visual", None)
    return list(visual.parameters()) if visual is not None else []


def _backbone_forward(self, **inputs):
    """``self.model(**inputs)`` as a method of the root, so that FSDP2 gathers the root's shards
    (and sets up the backward) when the trainers run the backbone without ``forward``."""
    return self.model(**inputs)


def vision_features(model: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The vision tower's ``get_image_features`` output for these images: the class's method, so
    an instance patch (``models/shared_vision.py``) does not answer it. ``shard_model`` registers
    it as a forward method of the FSDP2 root (the tower's weights live in the root unit, gathered
    in the root's forward only)."""
    owner = vision_owner(model)
    return type(owner).get_image_features(owner, pixel_values, image_grid_thw, return_dict=True)


def reshard(model: torch.nn.Module) -> None:
    """Free the weights a no-grad forward left gathered (the root keeps its own from forward to
    backward). Needed after no-grad passes (old log-probs): a root still gathered when the next
    forward with gradients starts lost part of that forward's gradients (measured: the 2-process
    GRPO grad norm came out 1.40 instead of 1.88). No-op for an unsharded model."""
    if hasattr(model, "reshard"):
        model.reshard()


def load_device(device: torch.device) -> torch.device:
    """Where to load full weights before sharding: the CPU when distributed (each GPU then
    receives only its shard from ``fully_shard``), else ``device``."""
    return torch.device("cpu") if is_distributed() else device


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (collective); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over all shards: on DTensor gradients the norm is reduced over the
    ranks, so every rank sees the global norm ||g||_2 = sqrt(sum_ranks sum_i g_i^2) and scales
    by min(1, max_norm / ||g||_2)."""
    return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))


def rollout_model(model: torch.nn.Module, load_full) -> torch.nn.Module:
    """The model the rollout engine generates with. One process: the policy itself. Under
    torchrun: an unsharded copy (``load_full()``: bf16 on a GPU) holding the full weights,
    refreshed by :func:`sync_weights` after each update, so generation runs without collectives
    (each rank decodes for as long as its own prompts need) and with the engine's CUDA graphs."""
    if not is_distributed():
        return model
    full = load_full()
    sync_weights(model, full)
    return full


@torch.no_grad()
def sync_weights(sharded: torch.nn.Module, full: torch.nn.Module) -> None:
    """Copy the sharded policy's parameters into the unsharded rollout copy: each parameter is
    all-gathered (``full_tensor``, in the same order on every rank) and cast to the copy's dtype.
    A no-op when they are the same module (one process)."""
    if sharded is full:
        return
    dst = dict(full.named_parameters())
    for name, p in sharded.named_parameters():
        dst[name].copy_(full_tensor(p.detach()))


def uneven_shares(costs: Sequence[float], n: int) -> list[list[int]]:
    """Like :func:`balanced_shares`, but a remainder is allowed (shares differ by at most one
    item): for work without collectives (eval generation on full weights). Items go in
    descending cost, each to the share with the smallest total cost, then fewest items, then
    lowest rank; each share ascending. Deterministic, so every rank computes the same split."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    shares: list[list[int]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for s in range(0, len(order), n):
        lightest = sorted(range(n), key=lambda r: (totals[r], len(shares[r]), r))
        for r, i in zip(lightest, order[s:s + n]):
            shares[r].append(i)
            totals[r] += costs[i]
    return [sorted(s) for s in shares]


def gather_in_order(indices: Sequence[int], items: Sequence, total: int) -> list:
    """Every rank's ``items`` (item k of a rank is global item ``indices[k]``) put back in global
    order 0..total-1, on every rank (``all_gather_object``: each rank's share travels once as a
    pickle between the processes of one job). One process: ``items`` in ``indices`` order."""
    parts = all_gather((list(indices), list(items)))
    out: list = [None] * total
    seen = 0
    for idx, its in parts:
        for i, it in zip(idx, its):
            out[i] = it
        seen += len(idx)
    if seen != total:
        raise ValueError(f"the ranks returned {seen} items, expected {total}")
    return out


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``all_gather_object``: a pickle
    between the processes of one job). One process: ``[obj]``."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def finish(code: int = 0) -> None:
    """End a ``torchrun`` worker: on success (``code`` 0) a barrier first, so no rank leaves
    while another still talks to it; then Python's exit handlers, flushed stdio, and
    ``os._exit(code)``. No-op outside torchrun or before joining its process group.

    Why not a plain exit: the interpreter's teardown destroys the backend's C++ objects in no
    set order, and a rank of a finished run aborted there now and then (SIGABRT, "terminate
    called without an active exception"), turning a good run into a failed job - in CI, once
    after ``prism rl`` and twice after ``prism eval``, the last time with a barrier and
    ``destroy_process_group`` already before the exit. Every file a command writes is closed
    before this point, so skipping that teardown loses nothing. After an error the barrier is
    left out: the other ranks may never reach it."""
    if not (launched() and dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()
    atexit._run_exitfuncs()   # our own handlers (the math-verify workers) and logging's flush
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
