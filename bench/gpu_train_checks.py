"""GPU checks of the RL training step at Qwen3-VL-2B shape (random init); ~2-3 min on one H200.

    PYTHONPATH=src python bench/gpu_train_checks.py --out gpu_train_checks.json

Builds bench_gpu.py's Qwen3-VL-2B-shaped model (fp32 master weights, bf16 autocast as the
trainers run) and synthetic RL rows: a 256x256 image and 100-250 text tokens of prompt, then
8-200 response tokens (about 430 tokens at the longest, as in the reported crash). Then:

1. crash: one 64-row micro-batch forward+backward with gradient checkpointing, first enabled
   the old way (plain ``use_reentrant=False``: the reported CheckpointError is expected), then
   with ``enable_gradient_checkpointing`` (time, peak memory);
2. checkpointing exactness, fp32, 4 rows: gradients with vs without checkpointing, beside the
   run-to-run noise of the same forward+backward twice (relative L2 of the difference);
3. packing exactness, fp32, 8 rows of mixed lengths: loss and gradients packed vs padded;
4. packing speed, bf16 + checkpointing: all 64 rows forward+backward in padded micro-batches
   of 16 and 64 rows vs packed to token budgets of 4k/8k/16k (time, peak memory);
5. AdamW: ``build_optimizer`` is fused on CUDA; one step's time fused vs the foreach loop;
6. the on-policy shortcut: one GRPO update of the 64 rows, two-pass (old log-probs pass +
   update) vs one pass, time; and the two-pass ratio's distance from 1 (bf16 noise).

``--smoke`` runs the same code on the CPU with the tiny model (fewer rows), to check the
script itself. Prints a markdown table at the end; every section's numbers go to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch

from prism_rl.actor import ppo_update, sequence_logprobs, split_micro
from prism_rl.config import AlgoConfig, OptimConfig
from prism_rl.data.processing import collate, encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.models.loading import autocast_for, enable_gradient_checkpointing, special_ids, vision_token_ids
from prism_rl.models.logprobs import response_logprobs
from prism_rl.rollout.base import Rollouts, micro_batch
from prism_rl.trainers.optim import build_optimizer, build_scheduler


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_rollouts(proc, rows: int, seed: int = 0, image: int = 256) -> Rollouts:
    """``rows`` synthetic rollouts: prompt = one random image + 100-250 random text tokens,
    response = 8-200 random non-vision tokens (right-padded), groups of 8."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    tok = proc.tokenizer
    vocab = list(range(300, len(tok) - 30))
    encs = []
    for i in range(rows):
        buf = io.BytesIO()
        Image.fromarray((rng.random((image, image, 3)) * 255).astype("uint8")).save(buf, format="PNG")
        words = tok.decode(rng.choice(vocab, int(rng.integers(100, 250))).tolist())
        rec = Record(id=str(i), messages=[{"role": "user", "content": "<image>" + words}],
                     images=[ImageRef(data=buf.getvalue())])
        encs.append(encode_prompt(proc, rec))
    _, pad = special_ids(proc)
    batch = collate(encs, pad, "left")
    lengths = torch.tensor(rng.integers(8, 201, rows))
    R = int(lengths.max())
    allowed = torch.tensor(sorted(set(vocab) - set(vision_token_ids(tok))))
    resp = allowed[torch.from_numpy(rng.integers(0, len(allowed), (rows, R)))]
    mask = (torch.arange(R)[None] < lengths[:, None]).long()
    return Rollouts(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], prompt_mm_types=batch["mm_token_type_ids"],
        response_ids=resp.masked_fill(mask == 0, pad), response_mask=mask, group_ids=torch.arange(rows) // 8,
        texts=[""] * rows, finish_reasons=["stop"] * rows, records=[e.record for e in encs],
        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
        extras={"patches_per_row": [int(e.pixel_values.shape[0]) for e in encs],
                "images_per_row": [int(e.image_grid_thw.shape[0]) for e in encs]})


def fwd_bwd(model, ro: Rollouts, rows: list[list[int]], device, *, packed: bool, autocast: bool = True) -> float:
    """Sum over micro-batches ``rows`` of (token-mean NLL of the responses x token share), backward; returns it."""
    total_tokens = float(sum(ro.response_mask[r].sum() for r in rows))
    total = 0.0
    for r in rows:
        batch, P, mask = micro_batch(ro, r)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = mask.to(device)
        with autocast_for(device) if autocast else torch.autocast(device.type, enabled=False):
            lp = response_logprobs(model, batch, P, packed=packed)
        loss = -(lp * mask).sum() / total_tokens
        loss.backward()
        total += float(loss.detach())
    return total


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(fn, device, reps: int = 2):
    fn()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), peak_gib(device)


def check_crash(model, ro, device) -> dict:
    rows = [list(range(len(ro)))]
    out = {"rows": len(ro), "tokens": int(ro.prompt_mask.sum() + ro.response_mask.sum()),
           "padded_width": int(micro_batch(ro, rows[0])[0]["input_ids"].shape[1])}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # the old way
    try:
        fwd_bwd(model, ro, rows, device, packed=False)
        out["old_way"] = "no error"
    except torch.utils.checkpoint.CheckpointError as e:
        out["old_way"] = "CheckpointError: " + str(e).split("\n")[0][:120]
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    enable_gradient_checkpointing(model)

    def step():
        fwd_bwd(model, ro, rows, device, packed=False)
        model.zero_grad(set_to_none=True)
    out["fixed_s"], out["fixed_peak_gib"] = timed(step, device)
    out["fixed"] = "ok"
    return out


def _grads_of(model, ro, rows, device, packed=False, autocast=False):
    model.zero_grad(set_to_none=True)
    loss = fwd_bwd(model, ro, rows, device, packed=packed, autocast=autocast)
    g = grads(model).clone()
    model.zero_grad(set_to_none=True)
    return loss, g


def check_ckpt_exact(model, ro, device) -> dict:
    rows = [list(range(len(ro)))]
    model.gradient_checkpointing_disable()
    _, g0 = _grads_of(model, ro, rows, device)
    _, g0b = _grads_of(model, ro, rows, device)
    enable_gradient_checkpointing(model)
    _, g1 = _grads_of(model, ro, rows, device)
    out = {"rows": len(ro), "rel_l2_ckpt_vs_none": rel(g1, g0), "rel_l2_none_twice": rel(g0b, g0)}
    del g0, g0b, g1
    return out


def check_packed_exact(model, ro, device) -> dict:
    rows = [list(range(len(ro)))]
    l0, g0 = _grads_of(model, ro, rows, device)
    l0b, g0b = _grads_of(model, ro, rows, device)
    l1, g1 = _grads_of(model, ro, rows, device, packed=True)
    out = {"rows": len(ro), "response_lengths": ro.response_mask.sum(1).tolist(), "loss_padded": l0,
           "loss_packed": l1, "loss_abs_diff": abs(l1 - l0), "rel_l2_grad_packed_vs_padded": rel(g1, g0),
           "rel_l2_grad_padded_twice": rel(g0b, g0), "loss_abs_diff_padded_twice": abs(l0b - l0)}
    del g0, g0b, g1
    return out


def check_packed_speed(model, ro, device) -> dict:
    from prism_rl.actor import by_length
    order = by_length(ro, range(len(ro)))
    out = {}
    configs = [("padded_micro16", 16, None), ("padded_micro64", 64, None),
               ("packed_4096", 64, 4096), ("packed_8192", 64, 8192), ("packed_16384", 64, 16384)]
    for name, size, budget in configs:
        rows = split_micro(ro, order, size, budget)

        def step(rows=rows, budget=budget):
            fwd_bwd(model, ro, rows, device, packed=budget is not None)
            model.zero_grad(set_to_none=True)
        try:
            t, mem = timed(step, device, reps=1)
            out[name] = {"s": t, "peak_gib": mem, "micro_batches": len(rows)}
        except torch.cuda.OutOfMemoryError as e:
            out[name] = {"error": f"OOM: {str(e)[:100]}"}
            model.zero_grad(set_to_none=True)
        reset_peak(device)
    tokens = int(ro.prompt_mask.sum() + ro.response_mask.sum())
    padded = sum(len(r) * micro_batch(ro, r)[0]["input_ids"].shape[1] for r in split_micro(ro, order, 64))
    out["tokens"], out["padded_tokens_micro64"] = tokens, int(padded)
    return out


def check_adamw(model, device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, make in (("fused", lambda: build_optimizer(params, OptimConfig(lr=1e-6))),
                       ("foreach", lambda: torch.optim.AdamW(params, lr=1e-6, foreach=True))):
        opt = make()
        out[f"{name}_flag"] = bool(opt.defaults.get("fused"))
        out[f"{name}_step_s"], _ = timed(opt.step, device, reps=3)
        opt.state.clear()
        del opt
        reset_peak(device)
    model.zero_grad(set_to_none=True)
    return out


def check_on_policy(model, ro, device) -> dict:
    algo = AlgoConfig(micro_batch_size=16)
    adv = torch.randn(len(ro))
    snapshot = [p.detach().clone() for p in model.parameters()]
    out = {}
    for name, two_pass in (("two_pass", True), ("one_pass", False)):
        opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-6))
        sched = build_scheduler(opt, OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0), 10)
        sync(device)
        t = time.perf_counter()
        old = sequence_logprobs(model, ro, 16, device) if two_pass else None
        sync(device)
        t_lp = time.perf_counter() - t
        m = ppo_update(model, opt, sched, ro, adv, old, algo, 1.0, device)
        sync(device)
        out[name] = {"logprob_s": t_lp, "total_s": time.perf_counter() - t, "ratio_max": m["ratio_max"],
                     "ratio_min": m["ratio_min"], "clip_frac": m["clip_frac"]}
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)
        opt.state.clear()
        del opt
        reset_peak(device)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_train_checks.json")
    ap.add_argument("--tiny", default="/tmp/bench_tiny")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few rows: checks the script")
    args = ap.parse_args()
    from prism_rl.models.mrope import install_batched_rope_index
    from prism_rl.models.tiny import build_tiny, corpus_from_data
    tiny = Path(build_tiny(args.tiny, corpus_from_data(None)))
    if args.smoke:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        device = torch.device("cpu")
        model, proc = AutoModelForImageTextToText.from_pretrained(tiny), AutoProcessor.from_pretrained(tiny)
        big, small, image = 8, 3, 64
    else:
        from bench_gpu import build
        device = torch.device("cuda")
        model, proc = build(tiny, device)
        big, small, image = 64, 4, 256
    install_batched_rope_index(model)
    model.train()
    import transformers
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    ro_big = make_rollouts(proc, big, image=image)
    ro_small = make_rollouts(proc, small, seed=1, image=image)
    ro_mixed = make_rollouts(proc, 2 * small, seed=2, image=image)

    def section(name, fn):
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # one failing section must not lose the others' numbers
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-1500:]}
        res[name]["wall_s"] = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        reset_peak(device)
        print(name, json.dumps(res[name])[:500], flush=True)

    section("crash_micro64", lambda: check_crash(model, ro_big, device))
    section("ckpt_exact_fp32", lambda: check_ckpt_exact(model, ro_small, device))
    model.gradient_checkpointing_disable()
    section("packed_exact_fp32", lambda: check_packed_exact(model, ro_mixed, device))
    enable_gradient_checkpointing(model)
    section("packed_speed_bf16_ckpt", lambda: check_packed_speed(model, ro_big, device))
    section("adamw", lambda: check_adamw(model, device))
    section("on_policy_bf16_ckpt", lambda: check_on_policy(model, ro_big, device))
    Path(args.out).write_text(json.dumps(res, indent=2))
    print_table(res)


def _get(res, *keys, fmt="{:.3g}"):
    node = res
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return "n/a" if not (isinstance(node, dict) and "error" in node) else "error: " + node["error"][:60]
        node = node[k]
    return fmt.format(node) if isinstance(node, float) else str(node)


def print_table(res):
    c, e, p, s, a, o = (res.get(k, {}) for k in ("crash_micro64", "ckpt_exact_fp32", "packed_exact_fp32",
                                                  "packed_speed_bf16_ckpt", "adamw", "on_policy_bf16_ckpt"))
    print(f"\n| check ({res['device']}, torch {res['torch']}, transformers {res['transformers']}) | result |\n|---|---|")
    print(f"| micro-batch {_get(c, 'rows')} rows, width {_get(c, 'padded_width')}, checkpointing the old way | "
          f"{_get(c, 'old_way')} |")
    print(f"| same with enable_gradient_checkpointing: fwd+bwd s, peak GiB | {_get(c, 'fixed')}: "
          f"{_get(c, 'fixed_s')} s, {_get(c, 'fixed_peak_gib')} GiB |")
    print(f"| grads ckpt vs none, fp32, rel L2 (none vs none) | {_get(e, 'rel_l2_ckpt_vs_none')} "
          f"({_get(e, 'rel_l2_none_twice')}) |")
    print(f"| packed vs padded, fp32: loss abs diff; grad rel L2 (padded twice) | {_get(p, 'loss_abs_diff')}; "
          f"{_get(p, 'rel_l2_grad_packed_vs_padded')} ({_get(p, 'rel_l2_grad_padded_twice')}) |")
    for k in ("padded_micro16", "padded_micro64", "packed_4096", "packed_8192", "packed_16384"):
        print(f"| {_get(s, 'tokens')} tokens fwd+bwd, {k}: s, peak GiB, micro-batches | {_get(s, k, 's')}, "
              f"{_get(s, k, 'peak_gib')}, {_get(s, k, 'micro_batches')} |")
    print(f"| AdamW step s: build_optimizer (fused={_get(a, 'fused_flag')}) vs foreach | {_get(a, 'fused_step_s')} vs "
          f"{_get(a, 'foreach_step_s')} |")
    print(f"| GRPO update of {_get(c, 'rows')} rows: two-pass vs on-policy one-pass, s | {_get(o, 'two_pass', 'total_s')} "
          f"vs {_get(o, 'one_pass', 'total_s')} (old-logprob pass {_get(o, 'two_pass', 'logprob_s')} s) |")
    print(f"| two-pass ratio range (bf16 noise; one-pass is exactly 1) | {_get(o, 'two_pass', 'ratio_min')}.."
          f"{_get(o, 'two_pass', 'ratio_max')}, clip_frac {_get(o, 'two_pass', 'clip_frac')} |")


if __name__ == "__main__":
    main()
