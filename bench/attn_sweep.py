"""Launch settings of the decode engine's split-K attention kernel, measured on one GPU.

    PYTHONPATH=src python bench/attn_sweep.py --out attn_sweep.json     # ~2 min on an H200

At the 2B text shape (16 query heads, 8 KV heads, head dim 128, bf16 cache of 1,024 positions
per row), rows whose live lengths are spread over [prompt, prompt + new] as in the middle of a
rollout, it times ``rollout.kernels.decode_attention_triton`` for every combination of keys per
split, keys per block, warps and pipeline stages, checks each result against the torch formula
(``decode_attention_ref``), and reports the rate at which the kernel reads the live keys and
values against the card's measured copy bandwidth (the kernel's own bound). The last lines name
the fastest setting per row count as ``split,block,warps,stages`` (what ``engine_probe.py --attn``
takes).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from harness.measure import copy_bandwidth, timed

from prism_rl.rollout import kernels as K


def inputs(rows: int, prompt: int, new: int, length: int = 1024, hq: int = 16, hkv: int = 8, d: int = 128):
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(rows, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(rows, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.randint(prompt, prompt + new, (rows,), device="cuda", generator=g)
    attn_len = min(length, -(-(int(pos.max()) + 1) // 256) * 256)
    return q, kc, vc, pos, attn_len


def time_call(fn, reps: int = 50) -> float:
    """Mean seconds of one call over ``reps`` calls after a warm-up call (compilation)."""
    fn()
    secs, _ = timed(lambda: [fn() for _ in range(reps)], torch.device("cuda"))
    return secs / reps


def sweep(rows: int, prompt: int, new: int, bw: float, grid) -> list[dict]:
    q, kc, vc, pos, attn_len = inputs(rows, prompt, new)
    scale = q.shape[-1] ** -0.5
    live_bytes = 2 * int((pos + 1).sum()) * kc.shape[1] * kc.shape[3] * kc.element_size()
    ref = K.decode_attention_ref(q, kc, vc, K.attention_mask(pos, attn_len), attn_len, scale).float()
    out = []
    for split, block, warps, stages in grid:
        K.ATTN_CONFIG.update(split_keys=split, block_n=block, num_warps=warps, num_stages=stages)
        call = lambda: K.decode_attention_triton(q, kc, vc, pos, attn_len, scale)  # noqa: E731
        try:
            err = float((call().float() - ref).abs().max())
            secs = time_call(call)
        except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is listed
            out.append({"rows": rows, "config": [split, block, warps, stages], "error": f"{type(e).__name__}"})
            continue
        out.append({"rows": rows, "config": [split, block, warps, stages], "us": secs * 1e6, "max_abs_err": err,
                    "frac_of_copy_bw": live_bytes / secs / bw})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--prompt", type=int, default=260, help="prompt tokens (448 px image + question)")
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--out", default="attn_sweep.json")
    a = ap.parse_args()
    default = dict(K.ATTN_CONFIG)
    bw = copy_bandwidth(torch.device("cuda"), 2 << 30)
    grid = list(itertools.product([128, 256, 512], [32, 64, 128], [2, 4, 8], [2, 3]))
    results = []
    for rows in a.rows:
        results += sweep(rows, a.prompt, a.new, bw, grid)
        json.dump({"copy_bw": bw, "default": default, "results": results}, open(a.out, "w"), indent=1)
    K.ATTN_CONFIG.update(default)
    ok = [r for r in results if "us" in r and r["max_abs_err"] < 0.05]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; default {default}")
    print("| rows | split | block | warps | stages | us | of copy bandwidth | max abs err |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in a.rows:
        mine = sorted((r for r in ok if r["rows"] == rows), key=lambda r: r["us"])
        dflt = [r for r in mine if r["config"][:2] == [default["split_keys"], default["block_n"]]
                and r["config"][2:] == [4, 3]]
        for r in mine[:5] + dflt:
            print(f"| {rows} | " + " | ".join(map(str, r["config"])) + f" | {r['us']:.1f} | {r['frac_of_copy_bw']:.1%} | "
                  f"{r['max_abs_err']:.1e} |")
    for rows in a.rows:
        best = min((r for r in ok if r["rows"] == rows), key=lambda r: r["us"])
        print(f"best {rows}: " + ",".join(map(str, best["config"])))


if __name__ == "__main__":
    main()
