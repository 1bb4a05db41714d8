"""GPU benchmark of prism-rl's own code paths at a real model shape (random init).

Run on one GPU:  python bench/bench_gpu.py --out results.json
It builds a Qwen3-VL-2B-shaped model (text 2048 x 28 layers, vocab 151,936; vision 1024 x 24)
with random weights - honest for speed and memory, not for accuracy - behind the embedded
tiny processor (same patch 16 / merge 2 image path), and measures, in one process on one card:

1. per-token log-probs: prism's chunked head (``response_logprobs``) vs full-vocabulary logits
   (``model(**batch).logits`` + log_softmax), time and peak memory, forward+backward;
2. an SFT optimizer step (bf16 autocast, fp32 master weights) with and without gradient
   checkpointing: tokens/s and peak memory;
3. rollout generation through ``HFEngine`` (transformers generate): tokens/s, against the
   memory-bandwidth bound (weights + KV cache read once per decode step);
4. one GRPO step of ``prism_rl.trainers.rl`` pieces: rollout / old log-probs / update split.
Ratios inside one run are what to compare; absolute numbers hold for the card named.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prism_rl.models.loading import enable_gradient_checkpointing


def build(tiny_dir: Path, device):
    from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    proc = AutoProcessor.from_pretrained(tiny_dir)
    ids = proc.tokenizer.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}, pad_token_id=ids("<|endoftext|>"),
                         tie_word_embeddings=True),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, proc


def prompts(proc, n: int, text_tokens: int, image: int):
    """n prompts: one image of image x image pixels + random text of ``text_tokens`` tokens."""
    import io

    import numpy as np
    from PIL import Image

    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import ImageRef, Record
    rng = np.random.default_rng(0)
    out = []
    vocab = [t for t in range(300, len(proc.tokenizer) - 30)]
    for i in range(n):
        arr = (rng.random((image, image, 3)) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        words = proc.tokenizer.decode(rng.choice(vocab, text_tokens).tolist())
        rec = Record(id=str(i), messages=[{"role": "user", "content": "<image>" + words}],
                     images=[ImageRef(data=buf.getvalue())])
        out.append(encode_prompt(proc, rec))
    return out


def timed(fn, reps: int = 3):
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def bench_logprobs(model, batch, P, device):
    from prism_rl.models.logprobs import reference_token_logprobs, response_logprobs
    mask = batch["attention_mask"][:, P:].bool()

    def chunked():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = response_logprobs(model, batch, P, chunk_size=4096)
        (-(lp[mask]).mean()).backward()
        model.zero_grad(set_to_none=True)

    def full():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = reference_token_logprobs(model, batch)[:, P - 1:]
        (-(lp[mask]).mean()).backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = response_logprobs(model, batch, P).float()
        b = reference_token_logprobs(model, batch)[:, P - 1:].float()
    err = float((a[mask] - b[mask]).abs().max())
    tc, mc = timed(chunked)
    tf, mf = timed(full)
    return {"chunked_s": tc, "chunked_peak_gib": mc, "full_s": tf, "full_peak_gib": mf,
            "max_abs_diff_nats": err, "tokens": int(batch["attention_mask"].sum())}


def bench_sft(model, batch, checkpointing: bool):
    from prism_rl.models.logprobs import sft_loss
    if checkpointing:
        enable_gradient_checkpointing(model)
    else:
        model.gradient_checkpointing_disable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, mem = timed(step, reps=3)
    opt.state.clear()   # free the Adam moments before the next measurement
    torch.cuda.empty_cache()
    tokens = int(batch["attention_mask"].sum())
    n_params = sum(p.numel() for p in model.parameters())
    return {"step_s": t, "tokens_per_s": tokens / t, "peak_gib": mem, "mfu_vs_989_tflops":
            6 * n_params * tokens / t / 989e12}


def bench_generate(model, proc, ps, new_tokens: int, cache: str | None = None):
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine
    model.eval()
    eng = HFEngine(model, proc, cache_implementation=cache)
    params = SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0)
    # force full-length generations: never sample EOS
    eng.eos_id = -1
    model.generation_config.eos_token_id = None
    t, mem = timed(lambda: eng.generate(ps, params), reps=2)
    ro = eng.generate(ps, params)
    gen = int(ro.response_mask.sum())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad or True)
    B = len(ps)
    P = ro.prompt_ids.shape[1]
    cfg = model.config.text_config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2   # bf16 bytes
    mean_ctx = P + new_tokens / 2
    bytes_per_step = 2 * (n_params - sum(p.numel() for p in model.model.visual.parameters())) + B * mean_ctx * kv_per_token
    bw = 3.0e12   # measured device-to-device copy on these H100s (KINDS.md): ~3.0 TB/s
    bound = B / (bytes_per_step / bw)
    return {"seconds": t, "tokens_per_s": gen / t, "bound_tokens_per_s": bound, "fraction_of_bound": gen / t / bound,
            "batch": B, "prompt_len": P, "new_tokens": new_tokens, "peak_gib": mem}


def bench_rl_step(model, proc, ps, n, new_tokens, device):
    from prism_rl import algorithms as A
    from prism_rl.actor import ppo_update, sequence_logprobs
    from prism_rl.config import AlgoConfig, OptimConfig
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine
    from prism_rl.trainers.optim import build_optimizer, build_scheduler
    enable_gradient_checkpointing(model)
    eng = HFEngine(model, proc)
    algo = AlgoConfig(micro_batch_size=16)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-6))
    sched = build_scheduler(opt, OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0), 10)
    torch.cuda.synchronize()
    t = time.perf_counter()
    ro = eng.generate(ps, SamplingParams(n=n, max_new_tokens=new_tokens))
    torch.cuda.synchronize()
    t_gen = time.perf_counter() - t
    rewards = torch.rand(len(ro))
    adv = A.grpo_advantages(rewards, ro.group_ids)
    t = time.perf_counter()
    old = sequence_logprobs(model, ro, 16, device)
    torch.cuda.synchronize()
    t_lp = time.perf_counter() - t
    t = time.perf_counter()
    m = ppo_update(model, opt, sched, ro, adv, old, algo, 1.0, device)
    torch.cuda.synchronize()
    t_upd = time.perf_counter() - t
    return {"rollout_s": t_gen, "old_logprob_s": t_lp, "update_s": t_upd, "sequences": len(ro),
            "response_tokens": int(ro.response_mask.sum()), "clip_frac": m.get("clip_frac"),
            "ratio_mean": m.get("ratio_mean"), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--tiny", default="/tmp/bench_tiny")
    args = ap.parse_args()
    device = torch.device("cuda")
    from prism_rl.models.tiny import build_tiny, corpus_from_data
    tiny = build_tiny(args.tiny, corpus_from_data(None))
    model, proc = build(Path(tiny), device)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    import transformers
    res["transformers"] = transformers.__version__
    from prism_rl.data.processing import collate
    from prism_rl.models.loading import special_ids
    _, pad = special_ids(proc)
    # training batch: 8 sequences of ~1024 tokens (prompt with a 256x256 image + text, then "response")
    ps = prompts(proc, 8, 900, 256)
    for p in ps:
        p.labels = p.input_ids.clone()
        p.labels[: p.prompt_len // 2] = -100
    batch = {k: v.to(device) for k, v in collate(ps, pad, "right").items()}
    P = ps[0].prompt_len // 2

    def section(name, fn):
        try:
            res[name] = fn()
        except Exception as e:  # one failing section must not lose the others' numbers
            import traceback
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        torch.cuda.empty_cache()
        print(name, json.dumps(res[name])[:400], flush=True)

    section("logprobs", lambda: bench_logprobs(model, batch, P, device))
    enable_gradient_checkpointing(model)
    section("logprobs_ckpt", lambda: bench_logprobs(model, batch, P, device))
    model.gradient_checkpointing_disable()
    section("sft_no_ckpt", lambda: bench_sft(model, batch, False))
    section("sft_ckpt", lambda: bench_sft(model, batch, True))
    model.to(torch.bfloat16)
    gen_ps = prompts(proc, 64, 200, 256)
    section("generate", lambda: bench_generate(model, proc, gen_ps, 128))
    t = time.perf_counter()
    section("generate_static", lambda: bench_generate(model, proc, gen_ps, 128, cache="static"))
    res["generate_static"]["wall_incl_compile_s"] = time.perf_counter() - t
    model.to(torch.float32)
    section("rl_step", lambda: bench_rl_step(model, proc, gen_ps[:8], 8, 128, device))
    Path(args.out).write_text(json.dumps(res, indent=2))
    lp, g = res["logprobs"], res["generate"]
    if any("error" in v for v in res.values() if isinstance(v, dict)):
        print("some sections failed:", [k for k, v in res.items() if isinstance(v, dict) and "error" in v])
        return
    print("\n| measure | value |\n|---|---|")
    print(f"| device | {res['device']} |")
    print(f"| log-probs fwd+bwd: chunked / full time | {lp['chunked_s'] / lp['full_s']:.2f} |")
    print(f"| log-probs fwd+bwd: chunked / full peak memory | {lp['chunked_peak_gib'] / lp['full_peak_gib']:.2f} "
          f"({lp['chunked_peak_gib']:.1f} vs {lp['full_peak_gib']:.1f} GiB) |")
    print(f"| chunked vs full max |diff| (nats, bf16) | {lp['max_abs_diff_nats']:.3g} |")
    lc = res["logprobs_ckpt"]
    print(f"| with grad checkpointing: chunked / full time, peak memory | {lc['chunked_s'] / lc['full_s']:.2f}, "
          f"{lc['chunked_peak_gib'] / lc['full_peak_gib']:.2f} ({lc['chunked_peak_gib']:.1f} vs {lc['full_peak_gib']:.1f} GiB) |")
    for k in ("sft_no_ckpt", "sft_ckpt"):
        print(f"| SFT {k}: tokens/s, MFU, peak GiB | {res[k]['tokens_per_s']:.0f}, {res[k]['mfu_vs_989_tflops']:.1%}, "
              f"{res[k]['peak_gib']:.1f} |")
    print(f"| generate: tokens/s (fraction of bandwidth bound) | {g['tokens_per_s']:.0f} ({g['fraction_of_bound']:.1%}) |")
    gs = res["generate_static"]
    print(f"| generate static cache: tokens/s (bound), speed-up | {gs['tokens_per_s']:.0f} ({gs['fraction_of_bound']:.1%}), "
          f"{gs['tokens_per_s'] / g['tokens_per_s']:.2f}x |")
    r = res["rl_step"]
    print(f"| GRPO step 8x8x128: rollout / logprob / update s | {r['rollout_s']:.1f} / {r['old_logprob_s']:.1f} / "
          f"{r['update_s']:.1f} |")


if __name__ == "__main__":
    main()
