"""Rollout engines: every stage that samples from the policy gets one from :func:`make_engine`.

- ``hf``: :class:`~prism_rl.rollout.hf.HFEngine`, transformers' ``generate`` (any HF VLM);
- ``graph``: :class:`~prism_rl.rollout.graph.GraphEngine`, one prefill per prompt, static KV
  cache, CUDA-graph decode step (Qwen3-VL and Qwen3-VL-MoE text decoders; dense ones decode
  through fused weights and Triton kernels on CUDA, ``rollout.fused``);
- ``auto``: ``graph`` on CUDA, ``hf`` elsewhere (the CPU quick start keeps its reference engine).
"""

from __future__ import annotations

import torch

ENGINES = ("auto", "hf", "graph")


def make_engine(name: str, model, processor, device: torch.device | None = None, **kw):
    """The engine ``name`` over ``model`` (used in place, no copy). ``kw`` goes to the engine
    (``cache_implementation`` for ``hf``; ``use_graphs``/``check_every``/``fused`` for ``graph``,
    where ``fused="auto"`` means the engine's default)."""
    if name not in ENGINES:
        raise ValueError(f"rollout engine must be one of {ENGINES}, not {name!r}")
    device = device or next(model.parameters()).device
    if name == "auto":
        name = "graph" if torch.device(device).type == "cuda" else "hf"
    if name == "graph":
        from .graph import GraphEngine
        kw.pop("cache_implementation", None)
        if kw.get("fused") == "auto":
            kw["fused"] = None
        return GraphEngine(model, processor, device, **kw)
    from .hf import HFEngine
    return HFEngine(model, processor, device, **{k: v for k, v in kw.items() if k == "cache_implementation"})
