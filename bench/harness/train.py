"""Training suite: forward + backward + optimizer step on rollouts of mixed length, MFU.

Ours is ``prism_rl.actor.ppo_update`` itself (one mini-batch, one PPO epoch: length-sorted
micro-batches, chunked output head, whatever packing the actor does), on the model as
``load_policy`` leaves it (batched M-RoPE ids). The peer is the textbook transformers path on the
same micro-batches: ``model(**batch).logits`` -> ``log_softmax`` over the full vocabulary ->
the same PPO loss -> backward -> ``AdamW.step``. Both: fp32 master weights under bf16 autocast,
non-reentrant gradient checkpointing, the same rows, advantages and old log-probs.
Throughput counts prompt + response tokens; MFU is ``bounds.train_flops`` / time / matmul peak.
"""

from __future__ import annotations

import torch

from prism_rl import algorithms as A
from prism_rl.actor import by_length, ppo_update, sequence_logprobs
from prism_rl.config import AlgoConfig, OptimConfig
from prism_rl.models.loading import autocast_for, enable_gradient_checkpointing
from prism_rl.rollout.base import Rollouts, micro_batch
from prism_rl.trainers.optim import build_optimizer, build_scheduler

from . import data
from .bounds import Counts, train_flops
from .common import Ctx, guarded, prism_patched, row
from .measure import free, median, peak_gib, reset_peak, timed
from .shapes import build_model

PEER = "transformers full logits + log_softmax"


def training_model(shape: str, ctx: Ctx):
    """fp32 weights, train mode, non-reentrant gradient checkpointing, no KV cache."""
    model = build_model(shape, ctx.processor, ctx.device, torch.float32).train()
    enable_gradient_checkpointing(model)   # as load_policy does (the recompute keeps the forward's SDPA kernels)
    model.config.use_cache = False
    return model


def rollouts_for(ctx: Ctx, rows: int, longest: int, vocab: int, n: int = 8) -> Rollouts:
    """``rows`` synthetic rollouts (groups of ``min(n, rows)``) whose prompt + response is at most
    ``longest`` tokens, responses spread over [1/2, 1] of the room left."""
    n = min(n, rows)
    enc = data.prompts(ctx.processor, max(1, rows // n), ctx.image_size)
    room = longest - max(e.prompt_len for e in enc)
    if room < 2:
        raise ValueError(f"sequence length {longest} leaves no room for a response after a "
                         f"{max(e.prompt_len for e in enc)}-token prompt")
    return data.synth_rollouts(ctx.processor, enc, n, data.response_lengths(len(enc) * n, room), vocab)


def workload_flops(counts: Counts, ro: Rollouts) -> tuple[float, int]:
    """(forward + backward model FLOPs, tokens) of one pass over every row of ``ro``."""
    seqs = (ro.prompt_mask.sum(1) + ro.response_mask.sum(1)).tolist()
    return train_flops(counts, seqs, int(ro.response_mask.sum()), ro.extras["patches_per_row"]), int(sum(seqs))


def peer_update(model, opt, ro: Rollouts, adv: torch.Tensor, old_lp: torch.Tensor, micro: int, device) -> None:
    """One optimizer step over ``ro`` through full-vocabulary logits, token-mean PPO loss."""
    tokens = float(ro.response_mask.sum())
    order = by_length(ro, range(len(ro)))
    for s in range(0, len(order), micro):
        rows = order[s:s + micro]
        batch, P, mask = micro_batch(ro, rows)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = mask.to(device)
        with autocast_for(device):
            logits = model(**batch, use_cache=False).logits
        lp = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, batch["input_ids"][:, P:, None]).squeeze(-1)
        del logits
        loss, _ = A.policy_loss(lp, old_lp[rows, :mask.shape[1]].to(device), adv[rows].to(device), mask)
        (loss * float(mask.sum()) / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _time(ctx: Ctx, step) -> tuple[float, float | None]:
    step()                                   # warm-up (optimizer states allocated here)
    reset_peak(ctx.device)
    secs = median([timed(step, ctx.device)[0] for _ in range(ctx.reps)])
    return secs, peak_gib(ctx.device)


def run(ctx: Ctx) -> None:
    w = ctx.work
    for shape in w.shapes:
        config = (f"train {shape.upper()}: fwd+bwd+AdamW, {w.train_rows} rollouts of <= {w.train_len} tokens, "
                  f"micro-batch {w.train_micro}, grad ckpt")
        if ctx.wanted(config):
            _run_shape(ctx, shape, config)


def _run_shape(ctx: Ctx, shape: str, config: str) -> None:
    w, dev = ctx.work, ctx.device
    model = training_model(shape, ctx)
    counts = Counts.of(model)
    ro = rollouts_for(ctx, w.train_rows, w.train_len, model.config.text_config.vocab_size)
    flops, tokens = workload_flops(counts, ro)
    with prism_patched(model):
        old_lp = sequence_logprobs(model, ro, w.train_micro, dev)
    adv = torch.randn(len(ro), generator=torch.Generator().manual_seed(0))
    peer = ours = None
    with guarded(ctx, "train", config + " [peer]"):
        peer = _measure_peer(ctx, model, ro, adv, old_lp)
    model.zero_grad(set_to_none=True)   # a peer that failed mid-backward leaves gradients behind
    free(dev)
    with guarded(ctx, "train", config):
        ours = _measure_ours(ctx, model, ro, adv, old_lp)
    ctx.emit(_row(ctx, config, flops, tokens, peer, ours))
    del model
    free(dev)


def _measure_peer(ctx: Ctx, model, ro: Rollouts, adv: torch.Tensor, old_lp: torch.Tensor):
    """(seconds, peak GiB) of the textbook step; its optimizer dies with this frame."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return _time(ctx, lambda: peer_update(model, opt, ro, adv, old_lp, ctx.work.train_micro, ctx.device))


def _measure_ours(ctx: Ctx, model, ro: Rollouts, adv: torch.Tensor, old_lp: torch.Tensor):
    """(seconds, peak GiB) of ``ppo_update`` with prism's optimizer, on the patched model."""
    algo = AlgoConfig(micro_batch_size=ctx.work.train_micro)
    optim = OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0.0)
    opt = build_optimizer(model.parameters(), optim)
    sched = build_scheduler(opt, optim, 100)
    with prism_patched(model):
        return _time(ctx, lambda: ppo_update(model, opt, sched, ro, adv, old_lp, algo, 1.0, ctx.device))


def _row(ctx: Ctx, config: str, flops: float, tokens: int, peer, ours) -> dict:
    peak = ctx.calib["matmul_flops_per_s"]
    rate = lambda m: None if m is None else tokens / m[0]
    mfu = lambda m: None if m is None else flops / m[0] / peak
    detail = {"model_flops": flops, "tokens": tokens}
    for name, m in (("peer", peer), ("ours", ours)):
        if m is not None:
            detail |= {f"{name}_s": m[0], f"{name}_peak_gib": m[1]}
    note = "" if ours is None else f"MFU {mfu(ours):.1%}" + (f", peak {ours[1]:.1f} GiB" if ours[1] is not None else "")
    return row("train", config, "tokens/s", peer_name=PEER, peer=rate(peer), ours_name="prism ppo_update",
               ours=rate(ours), fraction=mfu(ours), peer_fraction=mfu(peer), note=note, **detail)
