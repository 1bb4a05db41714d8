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
    return {"same_tokens": bool(torch.equal(a.response_ids, b.response_ids)),
            "distinct_rows": len({tuple(r.tolist()) for r in a.response_ids}),
            "logprob_diff": float((a.logprobs - b.logprobs).abs().max())}


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    if len(sys.argv) == 3 and sys.argv[1] == "--engine":
        print(json.dumps(engine_check(sys.argv[2])))
        return
    g = torch.Generator().manual_seed(0)
    print(json.dumps({str(dt).split(".")[-1]: check(dt, g) for dt in (torch.float32, torch.bfloat16)}))


if __name__ == "__main__":
    main()
