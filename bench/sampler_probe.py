"""The decode loop's sampling step: torch ops against the one Triton kernel (``rollout/sampling.py``).

    PYTHONPATH=src:bench python bench/sampler_probe.py --out sampler.json            # GPU, ~20 s
    TRITON_INTERPRET=1 PYTHONPATH=src:bench python bench/sampler_probe.py --smoke     # CPU, tiny vocab
    PYTHONPATH=src:bench python bench/sampler_probe.py --sweep --out sweep.json       # GPU: block x splits

Per batch size and mode (greedy; unseeded at T 1; per-row seeded at T 1, ``rollout.per_row_seeds``)
on fp32 logits of the Qwen3-VL vocabulary (151,936) with a few suppressed ids: the median time of
one sampling step by each path, their ratio, the kernel's share of its bound (the logits read once
at the measured copy bandwidth, half of it since a copy both reads and writes), and whether the
two paths draw the same tokens (greedy and seeded: they must; unseeded draws use other noise) and
how far their log-probs are apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from harness.measure import copy_bandwidth, median, timed

from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.sampling import default_splits, sample, sample_triton

MODES = {"greedy": {"temperature": 0.0}, "unseeded": {"temperature": 1.0},
         "seeded": {"temperature": 1.0, "seed": 1, "prompt_keys": [0]}}


def inputs(rows: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(device)
    bias = torch.zeros(vocab)
    bias[torch.randint(0, vocab, (8,), generator=g)] = float("-inf")
    keys = torch.randint(0, 2**32, (rows,), generator=g).to(device)
    return logits, bias.to(device), keys


def one(rows: int, vocab: int, mode: str, device: torch.device, reps: int, bandwidth: float) -> dict:
    logits, bias, keys = inputs(rows, vocab, device)
    params = SamplingParams(n=1, max_new_tokens=1, return_logprobs=True, **MODES[mode])
    gen = torch.Generator(device=device).manual_seed(0)
    row_keys = keys if mode == "seeded" else None
    kernel_keys = None if mode == "greedy" else keys   # unseeded: the engine's random keys per wave

    def step(kernel: bool):
        return sample(logits, bias, params, gen, 5, kernel_keys if kernel else row_keys, kernel=kernel)
    out = {}
    for kernel in (False, True):
        step(kernel)   # warm-up (compilation)
        out[kernel] = median([timed(lambda k=kernel: step(k), device)[0] for _ in range(reps)]), step(kernel)
    (t_torch, (tok_t, lp_t)), (t_kernel, (tok_k, lp_k)) = out[False], out[True]
    bound = rows * vocab * 4 / (bandwidth / 2)
    lp_ref = torch.log_softmax(logits, -1).gather(-1, tok_k[:, None])[:, 0]   # T is 0 or 1 in every mode
    return {"rows": rows, "vocab": vocab, "mode": mode, "torch_s": t_torch, "kernel_s": t_kernel,
            "speedup": t_torch / t_kernel, "kernel_of_bound": bound / t_kernel,
            "same_tokens": None if mode == "unseeded" else bool(torch.equal(tok_t, tok_k)),
            "lp_diff_vs_torch": None if mode == "unseeded" else float((lp_t - lp_k).abs().max()),
            "lp_diff_vs_log_softmax": float((lp_ref - lp_k).abs().max())}


def sweep(rows: int, vocab: int, device: torch.device, reps: int) -> list[dict]:
    """The kernel's time per (block, programs per row), greedy and sampled, against the default's."""
    logits, bias, keys = inputs(rows, vocab, device)
    out = []
    for temp in (0.0, 1.0):
        for block in (1024, 2048, 4096):
            for splits in (1, 2, 4, 8, 16, 32, None):
                def step(b=block, sp=splits, tp=temp):
                    return sample_triton(logits, bias, keys, 5, tp, block=b, splits=sp)
                step()
                t = median([timed(step, device)[0] for _ in range(reps)])
                out.append({"rows": rows, "temperature": temp, "block": block, "kernel_s": t,
                            "splits": splits or f"default ({default_splits(rows, -(-vocab // block), device)})"})
    return out


def sweep_table(results: list[dict]) -> str:
    lines = ["| rows | T | block | programs per row | kernel |", "|---|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['temperature']} | {r['block']} | {r['splits']} | {1e3 * r['kernel_s']:.3f} ms |"
              for r in results]
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| rows | mode | torch | kernel | speedup | kernel of bound | same tokens | log-prob diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']} | {r['mode']} | {1e3 * r['torch_s']:.3f} ms | {1e3 * r['kernel_s']:.3f} ms | "
                     f"{r['speedup']:.1f}x | {r['kernel_of_bound']:.0%} | {r['same_tokens']} | "
                     f"{r['lp_diff_vs_log_softmax']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: 4 rows, 1,000 tokens")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel per block size and programs per row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.smoke else "cuda")
    rows, vocab, reps = ([4], 1000, 1) if a.smoke else (a.rows, 151_936, a.reps)
    bandwidth = copy_bandwidth(device, 1 << 24 if a.smoke else 2 << 30)
    results = [one(r, vocab, m, device, reps, bandwidth) for r in rows for m in MODES]
    print(table(results))
    swept = [r for n in rows for r in sweep(n, vocab, device, reps)] if a.sweep else []
    if swept:
        print(sweep_table(swept))
    if a.out:
        Path(a.out).write_text(json.dumps({"copy_bytes_per_s": bandwidth, "results": results, "sweep": swept},
                                          indent=1))
    return results


if __name__ == "__main__":
    main()
