"""GPU benchmark: our code beside its peer, in one process on one card, against the card's bounds.

    python bench/run.py --suite rollout|train|rlstep|all [--quick] --out results.json [--write-docs]
    python bench/run.py --device cpu --shape tiny --suite all --ours-engine hf   # CPU smoke, every path
    python bench/run.py --render a.json b.json --write-docs                      # docs from saved results

Suites (bench/harness/): ``rollout`` prism's engine (``make_engine(--ours-engine)``) vs transformers
``generate`` with its dynamic cache, 2B and 4B shapes, 64 and 512 sequences x 512 new tokens;
``train`` forward + backward + AdamW on rollouts of up to 2k tokens, MFU; ``rlstep`` a GRPO step of
``prism rl`` vs TRL's ``GRPOTrainer`` (8x8x256 and 16x16x1024) and the peak memory of a 4B step
with 16 x 8,192-token responses. The card's copy bandwidth and matmul rate are measured first.
The table is printed last; ``--out`` JSON is rewritten after every row, so a run cut short keeps
what it finished. TRL and its dependencies travel as wheels: ``bench/trl_wheels.sh``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import torch  # noqa: E402
from harness import report  # noqa: E402

SUITES = ("rollout", "train", "rlstep")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=["real", "tiny"], default="real",
                    help="real: the issue's 2B / 4B shapes and workloads; tiny: a CPU-sized model and workloads")
    ap.add_argument("--shapes", default=None, help="comma list overriding the rollout/train shapes (2b,4b)")
    ap.add_argument("--ours-engine", default="graph", help="name given to prism_rl.rollout.make_engine")
    ap.add_argument("--quick", action="store_true", help="one timed repetition after the warm-up (--reps 1)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (median reported)")
    ap.add_argument("--only", default=None, help="run only the rows whose configuration contains this text")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL in the rlstep suite")
    ap.add_argument("--mem-rollout", choices=["auto", "real", "synth"], default="auto",
                    help="memory row: real rl_step, or synthetic rollouts; auto = real iff a dedicated engine exists")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--commit", default=None, help="commit to record (the device machine's copy has no .git)")
    ap.add_argument("--out", default="bench_run.json")
    ap.add_argument("--write-docs", action="store_true", help="update the section of --docs from the results")
    ap.add_argument("--docs", default=str(HERE.parent / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="no measurement: print (and with --write-docs, write) the tables of saved results")
    return ap.parse_args(argv)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = [f"python {sys.version.split()[0]}"]
    for pkg in ("torch", "transformers", "trl", "datasets", "accelerate", "pyarrow"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - the device machine's copy has no .git
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU {platform.machine()} ({torch.get_num_threads()} torch threads)"


def measure(args: argparse.Namespace) -> dict:
    from harness import rlstep, rollout, train
    from harness.common import Ctx
    from harness.measure import calibrate
    from harness.shapes import REAL, TINY, build_processor
    device = torch.device(args.device)
    work = TINY if args.shape == "tiny" else REAL
    if args.shapes:
        from dataclasses import replace
        work = replace(work, shapes=tuple(args.shapes.split(",")))
    reps = 1 if args.quick else max(1, args.reps)
    argv = " ".join(sys.argv[1:])
    result = {"meta": {"command": f"python bench/run.py {argv}".strip(), "device": device_name(device),
                       "versions": versions(), "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                       "commit": args.commit or commit(), "reps": reps, "engine": args.ours_engine},
              "calib": calibrate(device, work.copy_bytes, work.matmul_n), "rows": []}
    out = Path(args.out)
    print("versions:", result["meta"]["versions"], flush=True)
    print("card:", report.calib_rows(result["calib"]), flush=True)

    def emit(r: dict) -> None:
        result["rows"].append(r)
        report.save(out, result)
        print(f"[{r['suite']}] {r['config']}: peer {r['peer']} ours {r['ours']} ratio {r['ratio']} "
              f"fraction {r['fraction']} {r['note']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        ctx = Ctx(device=device, calib=result["calib"], work=work, reps=reps, engine=args.ours_engine,
                  processor=build_processor(args.image_size), image_size=args.image_size, tmp=Path(tmp), emit=emit,
                  only=args.only, trl=not args.no_trl, mem_rollout=args.mem_rollout)
        suites = {"rollout": rollout.run, "train": train.run, "rlstep": rlstep.run}
        for name in SUITES if args.suite == "all" else (args.suite,):
            suites[name](ctx)
    report.save(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = [report.load(Path(p)) for p in args.render] if args.render else [measure(args)]
    if args.write_docs:
        report.write_docs(Path(args.docs), results)
        print(f"wrote the bench/run.py section of {args.docs}")
    for r in results:
        print("\n" + report.table(r))
    return 1 if any(r["note"].startswith(("error", "TRL error")) for res in results for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
