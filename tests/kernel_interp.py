"""Run the decode Triton kernels on CPU tensors under Triton's interpreter and print, as JSON,
per dtype and kernel output ``[triton vs torch reference, triton vs exact, reference vs exact]``:
the largest differences relative to the largest value, where "exact" is the torch reference
computed in fp32 from the same (rounded) inputs.

TRITON_INTERPRET=1 must be set before Triton is imported, so test_fused_decode.py runs this
file in a subprocess; by hand: ``TRITON_INTERPRET=1 python tests/kernel_interp.py``.
With ``--engine TINY_DIR`` it runs the fused engine with the split-K attention kernel against
the module path on that tiny checkpoint instead.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from prism_rl.rollout import kernels as K

HQ, HKV, D, H, INTER, B, T = 4, 2, 32, 48, 40, 3, 80
POS = torch.tensor([5, 0, 61])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _inputs(dtype: torch.dtype, g: torch.Generator) -> dict:
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    ang = torch.cat([torch.rand(B, D // 2, generator=g) * 6] * 2, -1)
    return {"x": rnd(B, H, scale=3.0), "w": rnd(H), "qkv": rnd(B, (HQ + 2 * HKV) * D), "qn": rnd(D), "kn": rnd(D),
            "cos": ang.cos().to(dtype), "sin": ang.sin().to(dtype), "kc": rnd(B + 1, HKV, T, D),
            "vc": rnd(B + 1, HKV, T, D), "gu": rnd(B, 2 * INTER, scale=2.0), "q": rnd(B, HQ, D)}


def _run(i: dict, triton: bool, split: int = 16) -> dict[str, torch.Tensor]:
    """Every kernel's outputs on inputs ``i`` (caches copied, so ``i`` is left as it is)."""
    kc, vc = i["kc"].clone(), i["vc"].clone()
    rope = K.qk_rope_cache_triton if triton else K.qk_rope_cache_ref
    q = rope(i["qkv"], i["qn"], i["kn"], 1e-6, i["cos"], i["sin"], kc, vc, POS, HQ)
    out = {"rmsnorm": (K.rmsnorm_triton if triton else K.rmsnorm_ref)(i["x"], i["w"], 1e-6),
           "qk_rope_q": q, "qk_rope_k_cache": kc, "qk_rope_v_cache": vc,
           "silu_mul": K.silu_mul_triton(i["gu"], block=16) if triton else K.silu_mul_ref(i["gu"])}
    for s in (16, 256):
        out[f"attention_split{s}"] = (
            K.decode_attention_triton(i["q"], i["kc"], i["vc"], POS, T, D ** -0.5, split_keys=s, block_n=16) if triton
            else K.decode_attention_ref(i["q"], i["kc"], i["vc"], K.attention_mask(POS, T), T, D ** -0.5))
    out["k_entries_written"] = (kc != i["kc"]).sum()
    return out


def check(dtype: torch.dtype, g: torch.Generator) -> dict:
    i = _inputs(dtype, g)
    tri, ref = _run(i, True), _run(i, False)
    exact = _run({k: v.float() for k, v in i.items()}, False)
    res = {k: [_rel(tri[k], ref[k]), _rel(tri[k], exact[k]), _rel(ref[k], exact[k])] for k in tri if k != "k_entries_written"}
    return res | {"k_entries_written": int(tri["k_entries_written"])}


def engine_check(tiny_dir: str) -> dict:
    """The fused engine with the split-K attention kernel (the rest runs in torch on CPU)
    against the module path: greedy tokens equal, and the largest log-prob difference."""
    from prism_rl.config import ModelConfig
    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import Record
    from prism_rl.models.loading import load_policy
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.graph import GraphEngine

    model, proc = load_policy(ModelConfig(path=tiny_dir), torch.device("cpu"), trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim >= 2 and "visual" not in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    prompts = [encode_prompt(proc, Record(id=str(i), messages=[{"role": "user", "content": "Count. " * (1 + 9 * i)}]))
               for i in range(2)]
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.0, return_logprobs=True)
    a = GraphEngine(model, proc, fused=False).generate(prompts, params)
    b = GraphEngine(model, proc, fused=True, split_k=True).generate(prompts, params)
    out = {"same_tokens": bool(torch.equal(a.response_ids, b.response_ids)),
           "distinct_rows": len({tuple(r.tolist()) for r in a.response_ids}),
           "logprob_diff": float((a.logprobs - b.logprobs).abs().max())}
    return out | sampler_engine_check(model, proc, prompts)


def sampler_engine_check(model, proc, prompts) -> dict:
    """The engine with the one-kernel sampler (``sample_kernel=True``, as on CUDA) against the
    torch path: greedy and per-row seeded runs give the same tokens and log-probs (the kernel
    computes the same formula); an unseeded run repeats under the same global seed."""
    from dataclasses import replace

    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.graph import GraphEngine

    def run(kernel: bool, params, seed: int = 0):
        eng = GraphEngine(model, proc, sample_kernel=kernel)
        torch.manual_seed(seed)
        return eng.generate(prompts, params)

    greedy = SamplingParams(n=2, max_new_tokens=8, temperature=0.0, return_logprobs=True)
    keyed = SamplingParams(n=3, max_new_tokens=8, temperature=0.8, return_logprobs=True, seed=7, prompt_keys=[4, 9])
    res = {}
    for name, params in (("greedy", greedy), ("keyed", keyed)):
        a, b = run(False, params), run(True, params)
        res[f"sampler_{name}_same"] = bool(torch.equal(a.response_ids, b.response_ids))
        res[f"sampler_{name}_lp_diff"] = float((a.logprobs - b.logprobs).abs().max())
    unkeyed = replace(keyed, seed=None, prompt_keys=None)
    one, again, other = run(True, unkeyed), run(True, unkeyed), run(True, unkeyed, seed=1)
    res["sampler_unkeyed_repeats"] = bool(torch.equal(one.response_ids, again.response_ids))
    res["sampler_unkeyed_seed_matters"] = not torch.equal(one.response_ids, other.response_ids)
    res["sampler_unkeyed_distinct_rows"] = len({tuple(r.tolist()) for r in one.response_ids})
    return res


def sampler_check(g: torch.Generator) -> dict:
    """The sampling kernel against :func:`sample_ref` on (5, 1000) logits with three suppressed
    tokens, a block of 256 (V not a multiple of it), one, two and four programs per row (the
    sampled default on the CPU), greedy and two temperatures, three steps:
    tokens equal (count of rows that differ) and the largest log-prob difference; and the torch
    reference against the engine's torch formula (``x / T``, softmax of unprocessed logits)."""
    from prism_rl.rollout.noise import gumbel
    from prism_rl.rollout.sampling import sample_ref, sample_triton

    x = 3 * torch.randn(5, 1000, generator=g)
    x[2, 500:] += 4.0                     # a row whose best tokens sit in a later block
    bias = torch.zeros(1000)
    bias[[3, 17, 999]] = float("-inf")
    keys = torch.randint(0, 2**32, (5,), generator=g)
    out = {"token_mismatches": 0, "lp_diff": 0.0, "ref_vs_engine_formula": 0, "suppressed_drawn": 0, "distinct": set()}
    for temp in (0.0, 0.7, 1.0):
        for t in (0, 3, 200):
            ta, la = sample_ref(x, bias, keys, t, temp)
            for splits in (1, 3, 4):   # one program per row; 3 asked (2 chunks of 512); 4 (the sampled default)
                tb, lb = sample_triton(x, bias, keys, t, temp, block=256, splits=splits)
                out["token_mismatches"] += int((ta != tb).sum())
                out["lp_diff"] = max(out["lp_diff"], float((la - lb).abs().max()))
                out["suppressed_drawn"] += int(bias[tb].isinf().sum())
                out["distinct"].add(tuple(tb.tolist()))
            z = x + bias if temp == 0 else (x + bias) / temp
            engine_tok = z.argmax(-1) if temp == 0 else (z.double() + gumbel(keys, t, 1000)).argmax(-1)
            out["ref_vs_engine_formula"] += int((engine_tok != ta).sum())
    out["distinct"] = len(out["distinct"])
    from prism_rl.rollout.sampling import kernel_agrees
    out["kernel_agrees"] = kernel_agrees(torch.device("cpu"))
    return out


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    if len(sys.argv) == 3 and sys.argv[1] == "--engine":
        print(json.dumps(engine_check(sys.argv[2])))
        return
    g = torch.Generator().manual_seed(0)
    res = {str(dt).split(".")[-1]: check(dt, g) for dt in (torch.float32, torch.bfloat16)}
    print(json.dumps(res | {"sampler": sampler_check(g)}))


if __name__ == "__main__":
    main()
