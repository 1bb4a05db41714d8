"""Build a large RL problem pool and a second held-out set for bench/rl_gpu_scale.sh.

Synthesises problems with seeds other than the quick start's (0), takes the `align` splits as
the RL pool and one seed's `test` split as a second held-out set, then drops every pool problem
whose image and question also occur in either held-out set (the digit and count families have
small problem spaces, so independent draws do collide) and duplicates within the pool.

Usage: python bench/make_rl_pool.py [--out runs/pool] [--n 50000] [--seeds 11,12] [--test2 4000]
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def problem_keys(table: pa.Table) -> list[str]:
    """One hash per row of its image bytes and question: equal keys mean the same problem."""
    images, infos = table.column("images").to_pylist(), table.column("extra_info").to_pylist()
    return [hashlib.md5(repr(im).encode() + repr(info["question"]).encode()).hexdigest()
            for im, info in zip(images, infos)]


def rows_not_in(table: pa.Table, banned: set[str], limit: int | None = None) -> pa.Table:
    """Rows whose key is neither banned nor seen earlier in the table (first `limit` kept)."""
    keep, seen = [], set(banned)
    for i, k in enumerate(problem_keys(table)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return table.take(keep[:limit] if limit else keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pool")
    ap.add_argument("--n", type=int, default=50000, help="problems synthesised per seed")
    ap.add_argument("--seeds", default="11,12")
    ap.add_argument("--test2", type=int, default=4000, help="size of the second held-out set")
    ap.add_argument("--quickstart-test", default="runs/quickstart/data/test.parquet")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "prism_rl.cli", "data", "synth", "--out", f"{tmp}/s{s}",
                                   "--n", str(args.n), "--seed", str(s)], stdout=subprocess.DEVNULL)
                 for s in seeds]
        if any(p.wait() for p in procs):
            sys.exit("synth failed")
        test = pq.read_table(args.quickstart_test)
        test2 = rows_not_in(pq.read_table(f"{tmp}/s{seeds[0]}/test.parquet"), set(problem_keys(test)), args.test2)
        held = set(problem_keys(test)) | set(problem_keys(test2))
        pool = rows_not_in(pa.concat_tables([pq.read_table(f"{tmp}/s{s}/align.parquet") for s in seeds]), held)
    pq.write_table(pool, out / "rl_pool.parquet")
    pq.write_table(test2, out / "test2.parquet")
    print(f"pool {pool.num_rows} problems -> {out/'rl_pool.parquet'}; test2 {test2.num_rows} -> {out/'test2.parquet'}")


if __name__ == "__main__":
    main()
