"""Does a policy's forward go NaN in the rollout engine? Greedy decoding of held-out prompts
through the graph engine (packed prefill, decode dtype ``--dtype``) for each policy folder,
counting the batches that raise ``NonfiniteLogits`` (whose message says which records, and
whether each is finite prefilled alone). On a CPU this runs the engine's torch path under bf16
autocast; on a GPU the fused decoder and Triton kernels too.

    python bench/nan_probe.py --data runs/s2cpu/data/matched/test.parquet --limit 448 \\
        runs/s2cpu/s*/matched/rl/*/final [--dtype bf16] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from prism_rl.config import ModelConfig
from prism_rl.data.layouts import read_records
from prism_rl.data.processing import encode_all
from prism_rl.models.loading import load_policy, special_ids
from prism_rl.rollout.base import NonfiniteLogits, SamplingParams
from prism_rl.rollout.graph import GraphEngine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def probe(policy: str, records: list, dtype: torch.dtype, batch: int, max_new_tokens: int) -> dict:
    """NaN batches, their first message, and empty responses of ``policy`` on ``records``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, proc = load_policy(ModelConfig(path=policy), device, trainable=False)
    eos, _ = special_ids(proc)
    prompts = encode_all(proc, records, eos_id=eos, max_length=768, with_response=False)
    engine = GraphEngine(model, proc, decode_dtype=dtype)
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    res = {"batches": 0, "nan_batches": 0, "empty": 0, "first_error": None}
    for s in range(0, len(prompts), batch):
        res["batches"] += 1
        try:
            res["empty"] += sum(t == "" for t in engine.generate(prompts[s:s + batch], params).texts)
        except NonfiniteLogits as e:
            res["nan_batches"] += 1
            res["first_error"] = res["first_error"] or str(e)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policies", nargs="+", help="policy folders")
    ap.add_argument("--data", required=True, help="held-out prompts (any layout prism reads)")
    ap.add_argument("--limit", type=int, default=448)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the engine's decode dtype")
    a = ap.parse_args(argv)
    records = read_records(a.data)[:a.limit]
    print("| policy | batches | NaN batches | empty responses | s |\n|---|---|---|---|---|")
    for pol in a.policies:
        t0 = time.time()
        r = probe(pol, records, DTYPES[a.dtype], a.batch, a.max_new_tokens)
        print(f"| {pol} | {r['batches']} | {r['nan_batches']} | {r['empty']} | {time.time() - t0:.0f} |", flush=True)
        if r["first_error"]:
            print(f"  {r['first_error']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
