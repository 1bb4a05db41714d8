"""A verl ``examples/data_preprocess/geo3k.py``-style parquet, written from the public layout:
``data_source`` "hiyouga/geometry3k", a user prompt ending in the \\boxed{} instruction,
``images`` as ``{"bytes", "path"}`` structs, ``ability``, ``reward_model`` and ``extra_info``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import png_bytes

INSTRUCTION = (r"You FIRST think about the reasoning process as an internal monologue and then provide the final "
               r"answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
               r"BE put in \boxed{}.")


def geo3k_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        problem = f"<image>Find x. Round to the nearest tenth if necessary. (figure {i})"
        answer = str(5 + i)
        rows.append({"data_source": "hiyouga/geometry3k",
                     "prompt": [{"role": "user", "content": problem + " " + INSTRUCTION}],
                     "images": [{"bytes": png_bytes(), "path": None}], "ability": "math",
                     "reward_model": {"ground_truth": answer, "style": "rule"},
                     "extra_info": {"answer": answer, "index": i, "question": problem, "split": "train"}})
    return rows


def write_geo3k(path: Path, n: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(geo3k_rows(n)), path)
    return path
