"""Rollout suite: prism's engine beside transformers' ``generate`` with its default (dynamic) cache.

Same model object (bf16, eval), same prompts (448 px synthetic problems, each repeated for its
``n`` samples), same sampling (temperature 1, top-p 1, no top-k, vision tokens suppressed),
full-length generations (a random model almost never samples EOS: p ~ 1/151,936 a token). The
peer gets one short warm-up call; ours' first call is timed on its own (compilation / graph
capture), then both are timed ``reps`` times and the median kept. Throughput counts generated
tokens (up to and including EOS) over the call's wall time, host work included.
"""

from __future__ import annotations

import torch

from prism_rl.data.processing import Encoded, collate
from prism_rl.models.loading import special_ids, vision_token_ids
from prism_rl.rollout.base import SamplingParams, response_mask

from . import data
from .bounds import Counts, rollout_bound_s
from .common import Ctx, engine_factory, guarded, prism_patched, row
from .measure import free, median, timed
from .shapes import build_model

PEER = "transformers generate (dynamic cache)"


def peer_generate(model, processor, enc: list[Encoded], n: int, new_tokens: int, device) -> list[int]:
    """transformers' ``generate`` on the left-padded batch of every prompt repeated ``n`` times;
    returns each row's response length (up to and including the first EOS)."""
    eos, pad = special_ids(processor)
    batch = collate([e for e in enc for _ in range(n)], pad, side="left")
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():   # top_k=None, said explicitly: left unset, transformers 5 applies top-k 50
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=None, eos_token_id=eos, pad_token_id=pad,
                             suppress_tokens=vision_token_ids(processor.tokenizer))
    resp = out[:, inputs["input_ids"].shape[1]:].cpu()
    return response_mask(resp, eos).sum(1).tolist()


def _rate_and_fraction(ctx: Ctx, counts: Counts, enc: list[Encoded], n: int, lens: list[int], secs: float):
    patches = [int(e.pixel_values.shape[0]) for e in enc]
    rows_p = [e.prompt_len for e in enc for _ in range(n)]
    bound = rollout_bound_s(counts, ctx.calib, [e.prompt_len for e in enc], patches, rows_p, lens)
    return sum(lens) / secs, bound["total_s"] / secs, bound


def _run_peer(ctx: Ctx, model, enc, n, new) -> tuple[float, list[int]]:
    peer_generate(model, ctx.processor, enc, n, 4, ctx.device)            # warm-up: kernels, allocator
    runs = [timed(lambda: peer_generate(model, ctx.processor, enc, n, new, ctx.device), ctx.device)
            for _ in range(ctx.reps)]
    return median([t for t, _ in runs]), runs[-1][1]


def _run_ours(ctx: Ctx, engine, enc, n, new) -> tuple[float, float, list[int]]:
    params = SamplingParams(n=n, max_new_tokens=new, temperature=1.0, top_p=1.0)
    first, _ = timed(lambda: engine.generate(enc, params), ctx.device)
    runs = [timed(lambda: engine.generate(enc, params), ctx.device) for _ in range(ctx.reps)]
    return first, median([t for t, _ in runs]), runs[-1][1].response_mask.sum(1).tolist()


def run(ctx: Ctx) -> None:
    w = ctx.work
    make, label = engine_factory(ctx.engine)
    for shape in w.shapes:
        configs = [(s, f"rollout {shape.upper()}: {s} seq ({s // w.rollout_n} prompts x {w.rollout_n}) x "
                       f"{w.rollout_new} new tokens") for s in w.rollout_seqs]
        configs = [(s, c) for s, c in configs if ctx.wanted(c)]
        if configs:
            _run_shape(ctx, shape, configs, make, label)


def _run_shape(ctx: Ctx, shape: str, configs: list[tuple[int, str]], make, label: str) -> None:
    w = ctx.work
    model = build_model(shape, ctx.processor, ctx.device, torch.bfloat16).eval()
    counts = Counts.of(model)
    prompts = {s: data.prompts(ctx.processor, s // w.rollout_n, ctx.image_size) for s, _ in configs}
    peer: dict[int, tuple] = {}
    for s, config in configs:   # the peer first, on plain transformers
        with guarded(ctx, "rollout", config + " [peer]"):
            peer[s] = _run_peer(ctx, model, prompts[s], w.rollout_n, w.rollout_new)
    engine = None
    with prism_patched(model):
        for s, config in configs:   # an engine failure becomes its own error row; the peer's numbers stay
            ours = None
            if make is not None:
                with guarded(ctx, "rollout", config + " [ours]"):
                    if engine is None:
                        engine = make(model, ctx.processor, ctx.device)
                    ours = _run_ours(ctx, engine, prompts[s], w.rollout_n, w.rollout_new)
            ctx.emit(_row(ctx, counts, config, prompts[s], peer.get(s), ours, label))
    del engine, model
    free(ctx.device)


def _row(ctx: Ctx, counts: Counts, config: str, enc, peer, ours, label: str) -> dict:
    n = ctx.work.rollout_n
    detail: dict = {"prompt_len_mean": sum(e.prompt_len for e in enc) / len(enc)}
    p_rate = p_frac = o_rate = o_frac = None
    note = ""
    if peer is not None:
        p_rate, p_frac, bound = _rate_and_fraction(ctx, counts, enc, n, peer[1], peer[0])
        detail |= {"peer_s": peer[0], "peer_tokens": sum(peer[1]), "bound": bound}
    if ours is not None:
        first, steady, lens = ours
        o_rate, o_frac, bound = _rate_and_fraction(ctx, counts, enc, n, lens, steady)
        detail |= {"ours_s": steady, "ours_first_call_s": first, "capture_s": first - steady,
                   "ours_tokens": sum(lens), "bound": bound}
        note = f"first call {first:.1f} s (compile/capture ~{max(first - steady, 0):.1f} s)"
    elif label.startswith("n/a"):
        note = label
    return row("rollout", config, "tokens/s", peer_name=PEER, peer=p_rate, ours_name=label, ours=o_rate,
               fraction=o_frac, peer_fraction=p_frac, note=note, **detail)
