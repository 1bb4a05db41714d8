"""The graph engine on this machine's device against transformers' ``generate`` when every row
of a wave ends (EOS) before the token limit: the case whose tokens the engine once lost
(docs/RESULTS.md, stage-2 study). The tiny model with redrawn text weights (every token depends
on its context), greedy, four prompts x 2 samples; EOS is set to a token each row emits early.
Prints one line per case and exits 1 on a mismatch. On CUDA this covers the fused decoder, the
CUDA graphs and the sampling kernel.

    python bench/engine_all_end_check.py
"""

from __future__ import annotations

import io
import sys
import tempfile

import torch
from PIL import Image

from prism_rl.config import ModelConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.models.loading import load_policy
from prism_rl.models.tiny import TinySpec, build_tiny
from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.graph import GraphEngine
from prism_rl.rollout.hf import HFEngine


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = [f"<caption>a red circle at {i}</caption><think>count {i}</think><answer>{i}</answer>" for i in range(50)]
    with tempfile.TemporaryDirectory() as tmp:
        model, proc = load_policy(ModelConfig(path=str(build_tiny(tmp, corpus, TinySpec(vocab_size=512)))), device,
                                  trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim >= 2 and "visual" not in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    prompts = [encode_prompt(proc, Record(id=str(i), messages=[{"role": "user", "content": "<image>" + "How many? " * (1 + i)}],
                                          images=[ImageRef(data=png(64 + 32 * (i % 2)))])) for i in range(4)]
    params = SamplingParams(n=2, max_new_tokens=40, temperature=0.0, return_logprobs=True)
    hf, graph = HFEngine(model, proc), GraphEngine(model, proc)
    free = hf.generate(prompts, params)
    # EOS: a token every row emits by step 12, so the whole wave ends early
    common = set.intersection(*(set(r[:12].tolist()) for r in free.response_ids))
    ok = True
    for label, eos in (("rows end at different steps (no EOS)", None), ("every row ends early", min(common, default=None))):
        if label.startswith("every") and eos is None:
            print(f"{label}: no token common to every row's first 12; case skipped")
            continue
        for eng in (hf, graph):
            eng.eos_id = eos if eos is not None else proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
        for check_every in (4, 16):
            graph.check_every = check_every
            a, b = hf.generate(prompts, params), graph.generate(prompts, params)
            same = torch.equal(a.response_ids, b.response_ids) and a.finish_reasons == b.finish_reasons
            ok &= same
            print(f"{device} | {label} | check_every {check_every} | finish {sorted(set(b.finish_reasons))} | "
                  f"max length {int(b.response_mask.sum(1).max())} | tokens equal to generate: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
