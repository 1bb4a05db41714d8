"""The graph engine's fused decode path (CPU: torch ops over the fused weights) against its
module path; the fused weights' refresh; LoRA effective weights; the fallback for layers it
does not know; and the Triton kernels against their torch references under the interpreter."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from prism_rl.config import ModelConfig, RolloutConfig
from prism_rl.models.loading import load_policy
from prism_rl.rollout import make_engine
from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.fused import FusedDecoder, effective_weight, unfusable_reason
from prism_rl.rollout.graph import GraphEngine
from prism_rl.rollout.hf import HFEngine

from conftest import mixed_prompts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _redraw(model, seed: int) -> None:
    """Text weights at std 0.3 (the untrained tiny model repeats one token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim >= 2 and "visual" not in name and "lora_" not in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    _redraw(model, 0)
    return model, proc


@pytest.fixture(scope="module")
def prompts(policy):
    _, proc = policy
    return mixed_prompts(proc, 2)


GREEDY = SamplingParams(n=2, max_new_tokens=20, temperature=0.0, return_logprobs=True)


def test_fused_cpu_path_equals_the_module_path(policy, prompts):
    model, proc = policy
    fused = GraphEngine(model, proc, fused=True)
    assert fused.fused is not None and fused.shadow is None
    assert fused.fused.head is model.get_output_embeddings().weight              # same dtype: read, not copied
    a = GraphEngine(model, proc, fused=False).generate(prompts, GREEDY)
    b = fused.generate(prompts, GREEDY)
    assert len({tuple(r.tolist()) for r in a.response_ids}) >= 3
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5
    torch.manual_seed(4)
    sa = GraphEngine(model, proc, fused=False).generate(prompts, SamplingParams(n=3, max_new_tokens=12, return_logprobs=True))
    torch.manual_seed(4)
    sb = fused.generate(prompts, SamplingParams(n=3, max_new_tokens=12, return_logprobs=True))
    assert torch.equal(sa.response_ids, sb.response_ids) and (sa.logprobs - sb.logprobs).abs().max() < 1e-5


def test_fused_weights_follow_the_policy(tiny_model_dir, prompts):
    """A long-lived fused engine refreshes its copy at every generate: after an update it
    samples what a fresh engine does, and not what it sampled before."""
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    _redraw(model, 0)
    engine = GraphEngine(model, proc, fused=True)
    before = engine.generate(prompts, GREEDY)
    _redraw(model, 1)
    after = engine.generate(prompts, GREEDY)
    module = GraphEngine(model, proc, fused=False).generate(prompts, GREEDY)
    assert not torch.equal(after.response_ids, before.response_ids)
    assert torch.equal(after.response_ids, module.response_ids)
    assert (after.logprobs - module.logprobs).abs().max() < 1e-5


def test_fused_bf16_copy_of_an_fp32_policy(policy, prompts):
    """decode_dtype bf16 over an fp32 policy: the fused weights (embedding and head included)
    are bf16 copies, and the step's output matches the bf16 module path closely."""
    model, proc = policy
    fused = GraphEngine(model, proc, fused=True, decode_dtype=torch.bfloat16)
    assert fused.fused.layers[0].qkv.dtype == torch.bfloat16 and fused.fused.head.dtype == torch.bfloat16
    assert fused.fused.head is not model.get_output_embeddings().weight
    assert fused.fused.head is fused.fused.embed                                  # tied: one bf16 copy
    params = SamplingParams(n=1, max_new_tokens=4, temperature=0.0, return_logprobs=True)
    a = GraphEngine(model, proc, fused=False, decode_dtype=torch.bfloat16).generate(prompts, params)
    b = fused.generate(prompts, params)
    assert torch.equal(a.response_ids[:, 0], b.response_ids[:, 0])       # the prefill's token: same path
    assert (a.logprobs[:, :2] - b.logprobs[:, :2]).abs().max() < 0.1     # bf16 rounding differs per kernel


def _lora_model(policy):
    model = copy.deepcopy(policy[0])
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0), model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:   # both drawn here: peft's init of A reads the global RNG
                prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
    return model.eval()


def test_effective_weight_of_a_peft_lora_linear(policy):
    model = _lora_model(policy)
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert hasattr(q, "base_layer")
    want = q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * 2.0    # alpha / r
    assert torch.allclose(effective_weight(q), want, atol=1e-6)
    x = torch.randn(3, q.in_features)
    assert torch.allclose(q(x), x @ effective_weight(q).t(), atol=1e-5)               # what forward applies
    assert not torch.allclose(effective_weight(q), q.base_layer.weight, atol=1e-3)
    q.enable_adapters(False)
    assert torch.equal(effective_weight(q), q.base_layer.weight)
    plain = policy[0].model.language_model.layers[0].self_attn.q_proj
    assert effective_weight(plain) is plain.weight


def test_fused_path_of_a_lora_policy_equals_its_module_path(policy, prompts):
    model, proc = _lora_model(policy), policy[1]
    a = GraphEngine(model, proc, fused=False).generate(prompts, GREEDY)
    b = GraphEngine(model, proc, fused=True).generate(prompts, GREEDY)
    base = GraphEngine(policy[0], proc, fused=True).generate(prompts, GREEDY)
    # 1e-4 as for the engines elsewhere: W + BA folded into one fp32 weight rounds differently from
    # x W + (x A) B, by ~1e-5 nats over 20 tokens for some adapter draws
    assert torch.equal(a.response_ids, b.response_ids) and (a.logprobs - b.logprobs).abs().max() < 1e-4
    assert not torch.equal(b.response_ids, base.response_ids)                  # the adapter is applied


def test_unknown_layers_keep_the_module_path(policy, prompts):
    model, proc = policy
    assert unfusable_reason(model.model.language_model) is None
    assert GraphEngine(model, proc).fused is None                               # CPU default: module path
    moe = copy.deepcopy(model)
    lm = moe.model.language_model
    lm.layers[1].mlp = torch.nn.Sequential(lm.layers[1].mlp)                     # an MLP it does not know
    assert "layer 1: the MLP is a Sequential" in unfusable_reason(lm)
    with pytest.raises(ValueError, match="dense Qwen3-VL text decoder: layer 1: the MLP"):
        GraphEngine(moe, proc, fused=True)
    with pytest.raises(ValueError, match="dense Qwen3-VL"):
        FusedDecoder(lm, moe.get_output_embeddings(), torch.float32)
    with pytest.raises(ValueError, match="split_k attention .* needs fused=True"):
        GraphEngine(model, proc, fused=False, split_k=True)


def _interpreted(*args: str) -> dict:
    """Run tests/kernel_interp.py with TRITON_INTERPRET=1 (read when Triton is imported, so in
    a subprocess); its last line of output is JSON."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{root / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(root / "tests" / "kernel_interp.py"), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_split_k_attention_in_the_engine_under_the_interpreter(tiny_model_dir):
    got = _interpreted("--engine", str(tiny_model_dir))
    assert got["distinct_rows"] >= 2 and got["same_tokens"], got
    assert got["logprob_diff"] < 1e-5, got
    # the one-kernel sampler in the engine: the torch path's draws, greedy and per-row seeded
    assert got["sampler_greedy_same"] and got["sampler_keyed_same"], got
    assert got["sampler_greedy_lp_diff"] < 1e-5 and got["sampler_keyed_lp_diff"] < 1e-5, got
    assert got["sampler_unkeyed_repeats"] and got["sampler_unkeyed_seed_matters"], got
    assert got["sampler_unkeyed_distinct_rows"] >= 4, got   # 6 rows, each its own noise stream


def test_triton_kernels_equal_torch_references_under_the_interpreter():
    """Every Triton kernel on CPU tensors (TRITON_INTERPRET=1, in a subprocess since the flag
    is read when Triton is imported), against its torch reference and the exact (fp32) result:
    fp32 within fp32 rounding; bf16 within four bf16 half-ulps (2^-8) of the largest value,
    since Triton 3.8's interpreter truncates casts to bf16 where the GPU rounds to nearest."""
    diffs = _interpreted()
    for dtype, tol in (("float32", 1e-6), ("bfloat16", 4 * 2**-8)):
        got = diffs[dtype]
        assert got.pop("k_entries_written") == 3 * 2 * 32          # rows x KV heads x head dim, nothing else
        assert set(got) == {"rmsnorm", "qk_rope_q", "qk_rope_k_cache", "qk_rope_v_cache", "silu_mul",
                            "attention_split16", "attention_split256"}
        for name, (vs_ref, vs_exact, ref_vs_exact) in got.items():
            assert vs_ref < tol and vs_exact < tol, (dtype, name, vs_ref, vs_exact)
            assert ref_vs_exact < tol                               # the reference itself is the right math
    assert diffs["float32"]["qk_rope_v_cache"][0] == 0.0           # v is copied, not computed
    s = diffs["sampler"]   # 27 calls x 5 rows: the kernel's draws are the reference's, none suppressed
    assert s["token_mismatches"] == 0 and s["lp_diff"] < 1e-5 and s["suppressed_drawn"] == 0, s
    assert s["ref_vs_engine_formula"] == 0 and s["distinct"] >= 6, s   # greedy repeats over t: 1 + 6 sampled
    assert s["kernel_agrees"] is True   # the engine's start-up check passes where the kernel is right


def test_sampling_kernel_splits_fill_the_card_and_never_exceed_the_blocks():
    """``default_splits``: rows x splits reaches the programs wanted (16 on the CPU), at least one
    program per row, at most one per block of the vocabulary."""
    from prism_rl.rollout.sampling import default_splits
    cpu = torch.device("cpu")
    assert [default_splits(r, 75, cpu) for r in (1, 5, 16, 512)] == [16, 4, 1, 1]
    assert default_splits(3, 2, cpu) == 2


def test_a_sampling_kernel_that_disagrees_with_its_reference_is_not_used(monkeypatch, caplog):
    """``kernel_agrees`` (run once before the graph engine turns the kernel on): a kernel whose
    tokens differ from the torch reference's is refused, with a warning saying so."""
    from prism_rl.rollout import sampling

    def off_by_one(x, bias, keys, t, temp):
        tok, lp = sampling.sample_ref(x, bias, keys, t, temp)
        return (tok + 1) % x.shape[1], lp
    monkeypatch.setattr(sampling, "sample_triton", off_by_one)
    with caplog.at_level("WARNING", logger="prism_rl.rollout.sampling"):
        assert sampling.kernel_agrees.__wrapped__(torch.device("cpu")) is False
    assert "disagrees with its torch reference" in caplog.text
    monkeypatch.setattr(sampling, "sample_triton", sampling.sample_ref)
    assert sampling.kernel_agrees.__wrapped__(torch.device("cpu")) is True


def test_rollout_fused_config_reaches_the_engine(policy):
    model, proc = policy
    assert RolloutConfig().fused == "auto"
    assert RolloutConfig.model_validate({"fused": True}).fused is True
    with pytest.raises(ValueError, match="fused"):
        RolloutConfig.model_validate({"fused": "sometimes"})
    assert make_engine("graph", model, proc, fused="auto").fused is None          # CPU: the module path
    assert make_engine("graph", model, proc, fused=True).fused is not None
    assert isinstance(make_engine("hf", model, proc, fused=True), HFEngine)


def _signature(fn, types: dict, consts: dict):
    from triton.compiler import ASTSource
    names = fn.arg_names
    return ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in names},
                     constexprs={(names.index(k),): v for k, v in consts.items()})


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_triton_kernels_compile_for_an_h100_class_gpu(dt):
    """The interpreter does not apply Triton's typing and lowering: compile every kernel ahead of
    time for sm_90 (PTX and cubin with Triton's bundled ptxas, no GPU needed), at the 2B shape."""
    import triton
    from triton.backends.compiler import GPUTarget

    from prism_rl.rollout import kernels as K
    from prism_rl.rollout import sampling as S
    ints = ("HQ", "HKV", "D", "SPLITS", "CHUNK", "H", "INTER", "kc_b", "kc_h", "kc_t", "vc_b", "vc_h", "vc_t")
    types = {n: "i32" for n in ints} | {"eps": "fp32", "scale": "fp32", "pos_ptr": "*i64"}
    types |= {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "y_ptr", "qkv_ptr", "qn_ptr", "kn_ptr", "cos_ptr", "sin_ptr",
                                    "kc_ptr", "vc_ptr", "q_ptr", "gu_ptr")}
    types |= {n: "*fp32" for n in ("o_ptr", "m_ptr", "l_ptr")}
    kernels = [(K._rmsnorm_kernel, {"BLOCK": 2048}), (K._qk_rope_cache_kernel, {"BLOCK_D": 128}),
               (K._silu_mul_kernel, {"BLOCK": 1024}),
               (K._attn_split_kernel, {"G": 2, "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128, "IEEE": dt == "fp32"}),
               (K._attn_combine_kernel, {"G": 2, "BLOCK_S": 4, "BLOCK_D": 128})]
    sampler = {"x_ptr": "*fp32", "c_ptr": "*fp32", "key_ptr": "*i64", "tok_ptr": "*i64", "lp_ptr": "*fp32",
               "l_ptr": "*fp32", "best_ptr": "*fp64", "V": "i32", "stride": "i32", "t_mix": "i32", "s": "fp32",
               "CHUNK": "i32"}
    kernels += [(S._sample_kernel, {"GREEDY": greedy, "FINAL": final, "BLOCK": 2048})
                for greedy in (True, False) for final in (True, False)]
    for fn, consts in kernels:
        compiled = triton.compile(_signature(fn, sampler if fn is S._sample_kernel else types, consts),
                                  target=GPUTarget("cuda", 90, 32))
        assert len(compiled.asm["cubin"]) > 1000, fn
        if fn is S._sample_kernel and not consts["GREEDY"]:   # the noise hash in 32-bit integer arithmetic
            ptx = compiled.asm["ptx"]
            assert "mul.lo.s32" in ptx and "shr.u32" in ptx and "shr.s32" not in ptx
