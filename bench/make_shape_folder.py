"""Write a random-init Qwen3-VL checkpoint folder of a real shape, loadable by every prism command.

    python bench/make_shape_folder.py --shape 4b --out /tmp/m4b [--device cuda] [--dtype bf16]

The weights are random (no hub access on the GPU machines): honest for speed and memory, not for
accuracy. The processor is the harness's (bench/harness/shapes.py): a real Qwen3-VL processor with
the embedded tiny BPE and a pixel cap that keeps 448 x 448 images whole (196 image tokens).
Initialised on ``--device`` (a GPU initialises 8B in seconds), saved in ``--dtype``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import torch  # noqa: E402
from harness.shapes import QWEN_TEXT, build_model, build_processor  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(QWEN_TEXT), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t = time.perf_counter()
    proc = build_processor(a.image_size)
    model = build_model(a.shape, proc, torch.device(a.device), DTYPES[a.dtype], seed=a.seed)
    out = Path(a.out)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {n / 1e9:.2f}B parameters, saved to {out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
