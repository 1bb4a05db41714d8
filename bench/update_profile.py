"""Where the GRPO update's time goes: ``ppo_update`` on 64 rollouts, variants timed and profiled.

    PYTHONPATH=src:bench python bench/update_profile.py --out update_profile.json      # H200, ~3 min
    PYTHONPATH=src:bench python bench/update_profile.py --smoke                        # CPU, tiny shape

The rows are the ``rlstep`` suite's 8 prompts x 8 samples (448 px images, responses spread over
the room that ``--longest`` leaves, prompt + response included) at the 2B shape; the update is ``ppo_update`` with
one mini-batch, as ``rl_step`` runs it. Each variant changes one thing from the ``rlstep`` setting
(fp32 master weights under bf16 autocast, gradient checkpointing, micro-batch 16, old log-probs
from the update's own forward, as ``rl_step`` does with one PPO epoch and one mini-batch) and
reports the median of ``--reps`` timed updates after a warm-up, with its model FLOPs
(``harness.bounds.train_flops``) as MFU. Then the base variant runs once under the profiler:
its CUDA kernels grouped into GEMMs / attention / elementwise+norm / optimizer / copies, the
top kernels, the GPU's busy share of the wall time (a low share means the host's launches
are the bound, not the kernels), the aten ops that own the most kernel time with their input
shapes (which copy is it?), and the host's waits on the GPU (each drains the launch queue).
A second profiled update records Python stacks: the copies, and the ops whose result the host
reads, grouped by the code that called them.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from harness.bounds import Counts
from harness.common import Ctx
from harness.measure import calibrate, free, median, peak_gib, reset_peak, sync, timed
from harness.shapes import REAL, TINY, build_processor
from harness.train import rollouts_for, training_model, workload_flops

from prism_rl.actor import ppo_update, sequence_logprobs
from prism_rl.config import AlgoConfig, OptimConfig
from prism_rl.models.mrope import install_batched_rope_index
from prism_rl.trainers.optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class Variant:
    name: str
    micro: int = 16
    checkpointing: bool = True
    bf16_weights: bool = False     # model weights in bf16 (no fp32 master copy, no autocast casts)
    freeze_vision: bool = False    # no gradient through the vision tower
    on_policy: bool = True         # old log-probs from the update's own forward (old_lp=None), as rl_step
    share_vision: bool = True      # the vision tower once per distinct image (models/shared_vision.py)
    compiled: bool = False         # torch.compile each text decoder layer (fuses norms, rotary, SiLU-mul, adds)


VARIANTS = (Variant("base (rlstep: fp32 master, ckpt, micro 16)"),
            Variant("vision tower per row", share_vision=False),
            Variant("micro 64", micro=64),
            Variant("no checkpointing", checkpointing=False),
            Variant("bf16 weights", bf16_weights=True),
            Variant("vision frozen", freeze_vision=True),
            Variant("old log-probs from a separate pass", on_policy=False),
            Variant("compiled decoder layers", compiled=True))

GROUPS = (("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|wgmma"),
          ("attention", r"flash|fmha|attention|sdpa|efficient"),
          ("optimizer", r"adam|multi_tensor|foreach"),
          ("copy/cast", r"copy|cast|convert|memcpy|memset|fill"),
          ("norm/elementwise/reduce", r"."))


def build(ctx: Ctx, v: Variant, shape: str):
    model = training_model(shape, ctx)
    install_batched_rope_index(model)
    if not v.checkpointing:
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
    if v.bf16_weights:
        model.to(torch.bfloat16)
    if v.compiled:   # regional compilation of each layer's parts (the layer itself holds the checkpoint call)
        for layer in model.model.language_model.layers:
            for part in (layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                part.compile(dynamic=True)
    if v.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    return model


def one_variant(ctx: Ctx, v: Variant, shape: str, rows: int, longest: int, reps: int, profile: bool) -> dict:
    """Median update seconds, MFU and peak memory of variant ``v``; the profile of one update if asked."""
    model = build(ctx, v, shape)
    counts = Counts.of(model)
    ro = rollouts_for(ctx, rows, longest, model.config.text_config.vocab_size)
    flops, tokens = workload_flops(counts, ro)
    algo = AlgoConfig(micro_batch_size=v.micro)
    adv = torch.randn(len(ro), generator=torch.Generator().manual_seed(0))
    optim = OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0.0)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], optim)
    sched = build_scheduler(opt, optim, 100)

    def update():   # the separate old log-prob pass, when the variant needs one, is part of its cost
        old_lp = None if v.on_policy else sequence_logprobs(model, ro, v.micro, ctx.device,
                                                            share_vision=v.share_vision)
        return ppo_update(model, opt, sched, ro, adv, old_lp, algo, 1.0, ctx.device, share_vision=v.share_vision)
    first_s, _ = timed(update, ctx.device)   # the warm-up update, compilation included
    update()   # a second warm-up: a compiled variant meets new micro-batch shapes in its first update
    reset_peak(ctx.device)
    secs = [timed(update, ctx.device)[0] for _ in range(reps)]
    out = {"variant": v.name, "first_update_s": first_s, "update_s": median(secs), "updates_s": secs,
           "tokens": tokens, "model_flops": flops,
           "mfu": flops / median(secs) / ctx.calib["matmul_flops_per_s"], "peak_gib": peak_gib(ctx.device)}
    if profile:
        out["profile"] = profiled(ctx, update)
    return out   # the model and optimizer die with this frame; the caller frees the cache


def profiled(ctx: Ctx, update) -> dict:
    """Kernel time by group, the top kernels, and the GPU-busy share of one update's wall time;
    then a second update recorded with Python stacks for the copy and host-read sites (recording
    stacks slows the host severalfold, so the first update's wall time and busy share do not
    carry that cost)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    sync(ctx.device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        update()
        sync(ctx.device)
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        t = by_name.setdefault(e.name, [0.0, 0])
        t[0] += e.device_time / 1e6
        t[1] += 1
    groups = {g: 0.0 for g, _ in GROUPS}
    for name, (s, _) in by_name.items():
        groups[next(g for g, pat in GROUPS if re.search(pat, name, re.I))] += s
    busy = sum(s for s, _ in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    stacks = torch._C._profiler._ExperimentalConfig(verbose=True)   # without it torch 2.11 records no Python frames
    with profile(activities=acts, with_stack=True, experimental_config=stacks) as traced:
        update()
        sync(ctx.device)
    return {"wall_s": wall, "kernel_s": busy, "gpu_busy_share": busy / wall if wall else None,
            "kernels": sum(c for _, c in by_name.values()), "groups_s": groups,
            "top": [{"name": n[:90], "s": s, "calls": c} for n, (s, c) in top],
            "top_ops": top_ops(prof, on_gpu=bool(kernels)), "host_waits": host_waits(prof),
            "copy_sites": copy_sites(traced, on_gpu=bool(kernels)), "sync_sites": sync_sites(traced)}


def top_ops(prof, on_gpu: bool, n: int = 20) -> list[dict]:
    """The aten ops with the most self kernel time (self CPU time without a GPU), grouped by
    their input shapes: which op, on which tensors, a group of kernels comes from."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    ops.sort(key=lambda e: -getattr(e, key))
    return [{"op": e.key, "shapes": str(e.input_shapes)[:160], "s": getattr(e, key) / 1e6, "calls": e.count}
            for e in ops[:n]]


COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous", "aten::index",
            "aten::fill_", "aten::zero_")


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::masked_select",
            "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave")   # ops whose result the host reads


def copy_sites(prof, on_gpu: bool, n: int = 12) -> list[dict]:
    """The copy-like aten ops with the most self kernel time, grouped by the Python frames that
    called them (the first frames outside torch): which code, not which op, the copies come from."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return op_sites(prof, COPY_OPS, lambda e: getattr(e, key) / 1e6, n)


def sync_sites(prof, n: int = 12) -> list[dict]:
    """The ops whose result the host reads (``.item()``, ``nonzero``, ``torch.equal`` ...),
    grouped by their callers, by number of calls: on device tensors each makes the host wait
    for the GPU; on host tensors (the rollouts') they cost nothing of the kind."""
    return op_sites(prof, SYNC_OPS, lambda e: float(e.count), n)


def op_sites(prof, ops: tuple[str, ...], weight, n: int) -> list[dict]:
    """Events of ``ops`` grouped by (op, the first three Python frames outside torch), top ``n``
    by summed ``weight(event)``."""
    sites: dict[tuple[str, str], list[float]] = {}
    for e in prof.key_averages(group_by_stack_n=12):
        if e.key not in ops:
            continue
        frames = [re.sub(r"^(nn\.Module: \w+?)_\d+$", r"\1", f)   # one site for every layer's instance
                  for f in (e.stack or []) if not f.startswith("<built-in") and "torch/" not in f][:3]
        site = sites.setdefault((e.key, " < ".join(frames) or "(torch internals)"), [0.0, 0])
        site[0] += weight(e)
        site[1] += e.count
    top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"op": op, "site": site[:300], "s": s, "calls": c} for (op, site), (s, c) in top]


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def host_waits(prof) -> dict:
    """Calls in which the host waits for the GPU (synchronisations, and blocking copies, which
    ``cudaMemcpy`` without Async is), their count and host seconds: each one empties the launch
    queue, so the GPU idles while the host launches what follows."""
    waits = [e for e in prof.key_averages() if e.key in SYNC_CALLS]
    return {"calls": sum(e.count for e in waits), "host_s": sum(e.cpu_time_total for e in waits) / 1e6,
            "by_call": {e.key: e.count for e in waits}}


def table(results: list[dict]) -> str:
    base = results[0]["update_s"]
    lines = ["| variant | update | vs base | MFU | peak |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['update_s']:.2f} s | {base / r['update_s']:.2f}x | {r['mfu']:.1%} | "
                     f"{r['peak_gib'] or 0:.1f} GiB |")
    prof = results[0].get("profile")
    if prof:
        lines += ["", f"profile of the base update: wall {prof['wall_s']:.2f} s, kernels {prof['kernel_s']:.2f} s "
                  f"({prof['gpu_busy_share']:.0%} busy), {prof['kernels']} kernels",
                  "| group | kernel s |", "|---|---|"]
        lines += [f"| {g} | {s:.3f} |" for g, s in prof["groups_s"].items()]
        lines += ["", "| top kernel | s | calls |", "|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['s']:.3f} | {t['calls']} |" for t in prof["top"]]
        lines += ["", "| top op | input shapes | s | calls |", "|---|---|---|---|"]
        lines += [f"| {t['op']} | {t['shapes']} | {t['s']:.3f} | {t['calls']} |" for t in prof["top_ops"]]
        lines += ["", "| copy op | called from | s | calls |", "|---|---|---|---|"]
        lines += [f"| {t['op']} | {t['site']} | {t['s']:.3f} | {t['calls']} |" for t in prof.get("copy_sites", [])]
        lines += ["", "| op the host waits on | called from | calls |", "|---|---|---|"]
        lines += [f"| {t['op']} | {t['site']} | {t['calls']} |" for t in prof.get("sync_sites", [])]
        w = prof["host_waits"]
        lines += ["", f"host waits on the GPU: {w['calls']} calls, {w['host_s']:.3f} s ({w['by_call']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 8 rows")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--longest", type=int, default=512, help="prompt + response tokens of the longest row")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default=None, help="comma-separated substrings of variant names (default all)")
    ap.add_argument("--out", default="update_profile.json")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.smoke else "cuda")
    work = TINY if a.smoke else REAL
    shape, rows, longest = ("tiny", 8, 320) if a.smoke else ("2b", a.rows, a.longest)
    ctx = Ctx(device=device, calib=calibrate(device, work.copy_bytes, work.matmul_n), work=work, reps=a.reps,
              engine="hf", processor=build_processor(448), image_size=448, tmp=Path("."), emit=print)
    variants = [v for v in VARIANTS if a.variants is None or any(s in v.name for s in a.variants.split(","))]
    results = []
    for i, v in enumerate(variants):
        try:
            results.append(one_variant(ctx, v, shape, rows, longest, a.reps, profile=i == 0))
            free(device)
        except Exception as e:  # noqa: BLE001 - one failing variant (e.g. out of memory) keeps the others
            results.append({"variant": v.name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            free(device)
        print(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}), flush=True)
        Path(a.out).write_text(json.dumps({"calib": ctx.calib, "rows": rows, "longest": longest, "results": results},
                                          indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
