"""Time M-RoPE position ids for an RL-sized batch: transformers' per-row get_rope_index against
prism_rl.models.mrope (batched), on the quick start's tiny checkpoint and real prompts.

Usage: python bench/mrope_speed.py [--rows 2048] [--device cuda] [--model runs/quickstart/sft/final]
"""
from __future__ import annotations

import argparse
import inspect
import time

import torch
from transformers import AutoModelForImageTextToText

from prism_rl.models.loading import load_processor
from prism_rl.models.mrope import batched_rope_index


def timed(fn, device: str, reps: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="runs/quickstart/sft/final")
    args = ap.parse_args()
    model = AutoModelForImageTextToText.from_pretrained(args.model).to(args.device)
    proc = load_processor(args.model)
    from PIL import Image
    img = Image.new("RGB", (96, 96), "white")
    text = [f"<|vision_start|><|image_pad|><|vision_end|>question {i} " + "word " * (i % 17) for i in range(args.rows)]
    batch = proc(text=text, images=[[img]] * args.rows, padding=True, padding_side="left", return_tensors="pt")
    batch = {k: v.to(args.device) for k, v in batch.items()}
    original = model.model.get_rope_index
    fast = batched_rope_index(original, model.config.image_token_id, model.config.vision_config.spatial_merge_size)
    kwargs = {k: v for k, v in batch.items() if k in inspect.signature(original).parameters}
    hf = timed(lambda: original(**kwargs), args.device)
    ours = timed(lambda: fast(**kwargs), args.device)
    print(f"| device | rows x len | transformers get_rope_index | batched | ratio |\n|---|---|---|---|---|\n"
          f"| {args.device} | {args.rows} x {batch['input_ids'].shape[1]} | {hf * 1e3:.1f} ms | {ours * 1e3:.2f} ms "
          f"| {hf / ours:.0f}x |")


if __name__ == "__main__":
    main()
