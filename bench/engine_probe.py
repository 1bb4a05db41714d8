"""Quick GPU probe of the graph rollout engine against transformers' generate (one card).

python bench/engine_probe.py --tiny-dir DIR [--rows 64] [--new 512] [--variants module fused fused-splitk]
Random-init Qwen3-VL-2B shape (bench_gpu.build), 448 px images; prints: greedy agreement
of each graph-engine variant with transformers' generate in bf16, tokens/s of each, capture
time, and the fraction of the decode bound (text weights + the KV cache read once per step at
the measured copy bandwidth). Variants: ``module`` (GraphEngine(fused=False), the module
path), ``fused`` (fused weights + Triton kernels, SDPA attention), ``fused-splitk`` (the same
with the split-K flash-decoding attention kernel), ``fused-splitk-torchsample`` (that, drawing
tokens with torch ops instead of the one sampling kernel), ``fused-splitk-prefill1`` (that,
prefilling one prompt per forward instead of packing them). ``--seeded``: the timed runs sample
with per-row seeds (``rollout.per_row_seeds``: counter-hash noise), as a multi-GPU run would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import build, prompts  # noqa: E402
from harness.measure import copy_bandwidth  # noqa: E402

from prism_rl.rollout.base import SamplingParams  # noqa: E402
from prism_rl.rollout.graph import GraphEngine  # noqa: E402
from prism_rl.rollout.hf import HFEngine  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


VARIANTS = {"module": {"fused": False}, "fused": {"fused": True, "split_k": False},
            "fused-splitk": {"fused": True, "split_k": True},
            "fused-splitk-torchsample": {"fused": True, "split_k": True, "sample_kernel": False},
            "fused-splitk-prefill1": {"fused": True, "split_k": True, "prefill_tokens": 1}}


def set_attn(spec: str) -> None:
    """Set the split-K kernel's launch settings: 'default' or split,block,warps,stages."""
    from prism_rl.rollout import kernels as K
    if not hasattr(set_attn, "default"):
        set_attn.default = dict(K.ATTN_CONFIG)
    K.ATTN_CONFIG.update(set_attn.default)
    if spec != "default":
        split, block, warps, stages = map(int, spec.split(","))
        K.ATTN_CONFIG.update(split_keys=split, block_n=block, num_warps=warps, num_stages=stages)


def agreement(hf, graph, ps, name: str) -> None:
    """Greedy bf16 tokens of ``graph`` vs generate, and log-probs before the first difference."""
    g = SamplingParams(n=2, max_new_tokens=64, temperature=0.0, return_logprobs=True)
    ra, rb = hf.generate(ps[:4], g), graph.generate(ps[:4], g)
    agree = (ra.response_ids == rb.response_ids).float().mean().item()
    first_diff = [int((x != y).nonzero()[0]) if bool((x != y).any()) else -1 for x, y in zip(ra.response_ids, rb.response_ids)]
    before = torch.zeros_like(ra.logprobs, dtype=torch.bool)
    for i, d in enumerate(first_diff):
        before[i, :d if d >= 0 else before.shape[1]] = True
    lpd = (ra.logprobs - rb.logprobs).abs()[before & ra.response_mask.bool()]
    print(f"[{name}] greedy bf16 token agreement {agree:.3f} (random-init logits are near-flat: bf16 ties flip argmax); "
          f"first differing step per row {first_diff}; logprob |diff| before it: mean {lpd.mean():.2e} max {lpd.max():.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[64])
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--profile", action="store_true",
                    help="profile 128 decode steps of the first --variants at the first --rows and stop")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--attn", nargs="+", default=["default"],
                    help="split-K attention launch settings to measure, each 'default' or split,block,warps,stages "
                         "(bench/attn_sweep.py prints the fastest)")
    ap.add_argument("--seeded", action="store_true", help="time per-row seeded sampling (rollout.per_row_seeds)")
    ap.add_argument("--no-generate", action="store_true",
                    help="skip transformers' generate (its rate, the ratio and the agreement checks)")
    a = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda"), 2 << 30)
    model, proc = build(Path(a.tiny_dir), "cuda")
    model = model.to(torch.bfloat16).eval()
    text_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    cfg = model.config.text_config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; text weights {text_bytes / 2**30:.2f} GiB; KV {kv_per_token} B/token")
    engines = {v: GraphEngine(model, proc, **VARIANTS[v]) for v in a.variants}
    graph = engines[a.variants[0]]
    hf = HFEngine(model, proc)
    ps = prompts(proc, 8, 300, 448)
    if a.profile:
        pp = ps[:max(1, a.rows[0] // a.n)]
        sp = SamplingParams(n=a.n, max_new_tokens=128, temperature=1.0)
        graph.generate(pp, sp)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _, t = timed(lambda: graph.generate(pp, sp))  # noqa: B023 (called at once)
        print(f"{a.rows[0]} rows x 128 tokens: {t:.3f} s")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
        eager = GraphEngine(model, proc, use_graphs=False, **VARIANTS[a.variants[0]])
        eager.generate(pp, sp)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, t = timed(lambda: eager.generate(pp, sp))  # noqa: B023 (called at once)
        print(f"eager: {t:.3f} s")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))
        return
    for name, eng in engines.items() if not a.no_generate else ():
        agreement(hf, eng, ps, name)
    from prism_rl.actor import sequence_logprobs
    for name, eng in engines.items():
        torch.manual_seed(0)
        ro = eng.generate(ps[:4], SamplingParams(n=4, max_new_tokens=128, temperature=1.0, return_logprobs=True))
        forced = sequence_logprobs(model, ro, 16, torch.device("cuda"), temperature=1.0)
        m = ro.response_mask.bool()
        d = (forced - ro.logprobs).abs()[m]
        print(f"[{name}] engine bf16 sampled log-probs vs training forward: mean |diff| {d.mean():.3e} "
              f"max {d.max():.3e} over {int(m.sum())} tokens")
        eng.state = None
        eng.graphs.clear()
    rows = []
    for R in a.rows:
        n = a.n
        k = max(1, R // n)
        pp = (ps * ((k + len(ps) - 1) // len(ps)))[:k]
        seeded = {"seed": 1, "prompt_keys": list(range(k))} if a.seeded else {}
        sp = SamplingParams(n=n, max_new_tokens=a.new, temperature=1.0, **seeded)
        mean_ctx = sum(int(p.input_ids.numel()) for p in pp) / len(pp) + a.new / 2
        bound = R * bw / (text_bytes + R * mean_ctx * kv_per_token)
        th = hf_tps = float("nan")
        if not a.no_generate:
            ro2, th = timed(lambda: hf.generate(pp, sp))  # noqa: B023 (called at once)
            hf_tps = int(ro2.response_mask.sum()) / th
            ro2 = None
        for name, eng, attn in [(v, e, c) for v, e in engines.items() for c in a.attn]:
            set_attn(attn)
            name = name if attn == "default" else f"{name}[{attn}]"
            eng.capture_s = 0.0
            eng.generate(pp, SamplingParams(n=n, max_new_tokens=32, temperature=1.0))     # capture
            cap = eng.capture_s
            ro, tg = timed(lambda: eng.generate(pp, sp))  # noqa: B023 (called at once)
            tps = int(ro.response_mask.sum()) / tg
            eng.state, ro = None, None
            eng.graphs.clear()
            torch.cuda.empty_cache()
            rows.append((R, a.new, name, tps, hf_tps, tps / hf_tps, tps / bound, cap, tg, th))
            print(rows[-1], flush=True)
    print("rows | new | engine | graph tok/s | generate tok/s | ratio | frac of bound | capture s | graph s | generate s")
    for r in rows:
        print(" | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in r))
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
