"""``prism quickstart``: the whole PRISM recipe on the embedded default, on a 2-core CPU.

    synth data -> tiny Qwen3-VL -> SFT -> eval
                                    |-> difficulty filter (SFT policy) -> RL problem set
                                    |-> SFT + GRPO (3 seeds) -> eval                  (baseline)
                                    '-> disc init -> pairs -> warm-up -> align -> eval
                                                              '-> PRISM + GRPO (3 seeds) -> eval

Every stage is the real ``prism`` command, run as a subprocess and printed, so the quick start
doubles as a worked example of the CLI. Tiny models run fastest with one torch thread per
process (intra-op threading costs more than it gains at this size), so independent branches
run side by side, one per core. A stage whose output exists is skipped: rerunning after an
interruption continues where it stopped (``--fresh`` starts over). The final table follows
METHOD.md section 9 at toy scale and is written to ``<out>/results.md``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from .config import ConfigError, Section, load_config


class QuickstartSettings(Section):
    """Knobs of the quick start (``prism quickstart key=value``)."""

    problems: int = 6000
    rl_seeds: list[int] = [0, 1, 2]
    workers: int = 2
    sft_epochs: float = 4.0
    filter_limit: int = 192
    filter_n: int = 8
    filter_low: float = 0.125
    filter_high: float = 0.875
    grpo_steps: int = 30
    align_steps: int = 30
    pairs_limit: int = 448
    eval_limit: int | None = Field(448, description="Held-out problems per evaluation (test set: 900).")


@dataclass
class Lane:
    """A sequence of stages that must run in order; a lane starts once the lanes it comes
    ``after`` have finished, and lanes run side by side (one per worker)."""

    name: str
    after: tuple[str, ...] = ()
    stages: list[tuple[str, list[str], Path]] = field(default_factory=list)   # (label, argv, done-marker)

    def add(self, label: str, argv: list[str], done: Path) -> Lane:
        self.stages.append((label, argv, done))
        return self


def _prism(*args: str, threads: int = 1) -> list[str]:
    return [sys.executable, "-m", "prism_rl.cli", "--threads", str(threads), *args]


def _run_lane(lane: Lane, logs: Path) -> float:
    total = 0.0
    for label, argv, done in lane.stages:
        if done.exists():
            print(f"  [skip] {label} (done: {done})", flush=True)
            continue
        log = logs / f"{label}.log"
        printable = " ".join(shlex.quote(a) for a in ["prism", *argv[3:]])
        print(f"  [run ] {label}: {printable}", flush=True)
        t = time.time()
        with log.open("w") as f:
            rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        dt = time.time() - t
        total += dt
        if rc != 0 or not done.exists():   # exit 0 without its output: a training stage stopped by a signal
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            what = f"failed (exit {rc})" if rc else f"stopped before writing {done}"
            raise RuntimeError(f"stage '{label}' {what}; log {log}:\n{tail}")
        print(f"  [done] {label} in {dt:.0f}s", flush=True)
    return total


def run_lanes(lanes: list[Lane], logs: Path, workers: int) -> None:
    """Run lanes as their dependencies allow, at most ``workers`` at a time, in list order."""
    names = {lane.name for lane in lanes}
    for lane in lanes:
        if set(lane.after) - names:
            raise ValueError(f"lane {lane.name} waits for unknown lanes {set(lane.after) - names}")
    done: set[str] = set()
    running: dict = {}
    pending = list(lanes)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for lane in [ln for ln in pending if set(ln.after) <= done][: workers - len(running)]:
                pending.remove(lane)
                running[pool.submit(_run_lane, lane, logs)] = lane.name
            if not running:
                raise ValueError(f"lanes {[ln.name for ln in pending]} can never start")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                fut.result()   # a failed stage stops the quick start with its log tail
                done.add(running.pop(fut))


def _eval(label: str, model: Path, data: Path, out: Path, limit: int | None) -> tuple:
    """Held-out eval of ``model`` as run ``out.name`` under ``out.parent`` (eval/layout.py)."""
    args = ["eval", "--config", "configs/quickstart/eval.yaml", "--model", str(model), "--data", str(data),
            "--out", str(out.parent), "--name", out.name]
    if limit:
        args.append(f"data.limit={limit}")
    return label, _prism(*args), _heldout_summary(out, data)


def _heldout_summary(run: Path, data: Path) -> Path:
    from .eval.layout import heldout_part
    return run / heldout_part(data) / "summary.json"


def plan(out: Path, s: QuickstartSettings, seed: int) -> list[Lane]:
    """The stages, as lanes with dependencies (longest chains first, so they start first)."""
    d, tiny = out / "data", out / "tiny"
    sft = out / "sft" / "final"
    rl_data = out / "data" / "rl.parquet"
    test = d / "test.parquet"
    disc = out / "disc"
    align_policy = out / "align" / "final" / "policy"
    prep = Lane("prepare").add("synth", _prism("data", "synth", "--out", str(d), "--n", str(s.problems), "--seed",
                                               str(seed)), d / "stats.json")
    prep.add("tiny-model", _prism("model", "tiny", "--out", str(tiny), "--data", str(d)), tiny / "config.json")
    prep.add("sft", _prism("sft", "--config", "configs/quickstart/sft.yaml", f"model.path={tiny}",
                           f"data.train={d / 'sft.json'}", f"output_dir={out / 'sft'}",
                           f"train.epochs={s.sft_epochs}", f"train.seed={seed}", threads=2), sft / "config.json")
    eval_sft = Lane("eval-sft", after=("prepare",)).add(*_eval("eval-sft", sft, test, out / "eval" / "sft", s.eval_limit))
    eval_sft.add("filter", _prism("data", "filter-difficulty", "--model", str(sft), "--data", str(d / "align.parquet"),
                                  "--out", str(rl_data), "--n", str(s.filter_n), "--low", str(s.filter_low),
                                  "--high", str(s.filter_high), "--max-new-tokens", "200",
                                  "--limit", str(s.filter_limit), "--seed", str(seed)), rl_data)
    warm = Lane("discriminator", after=("prepare",))
    warm.add("disc-init", _prism("disc", "init", "--from", str(sft), "--out", str(disc / "init"), "--seed", str(seed)),
             disc / "init" / "prism_discriminator.json")
    warm.add("disc-pairs", _prism("disc", "pairs", "--policy", str(sft), "--data", str(d / "align.parquet"),
                                  "--out", str(disc / "pairs.jsonl"), "--max-new-tokens", "200",
                                  "--limit", str(s.pairs_limit), "--seed", str(seed)), disc / "pairs.jsonl")
    warm.add("disc-warmup", _prism("disc", "warmup", "--config", "configs/quickstart/warmup.yaml",
                                   f"disc.path={disc / 'init'}", f"data.train={disc / 'pairs.jsonl'}",
                                   f"output_dir={disc / 'warmup'}", f"train.seed={seed}"),
             disc / "warmup" / "final" / "prism_discriminator.json")
    warm.add("align", _prism("align", "--config", "configs/quickstart/align.yaml", f"model.path={sft}",
                             f"disc.path={disc / 'warmup' / 'final'}", f"data.train={d / 'align.parquet'}",
                             f"output_dir={out / 'align'}", f"train.steps={s.align_steps}", f"train.seed={seed}"),
             align_policy / "config.json")
    warm.add(*_eval("eval-aligned", align_policy, test, out / "eval" / "aligned", s.eval_limit))
    rl_lanes = []
    for rs in s.rl_seeds:
        for name, start in (("sft_grpo", sft), ("prism_grpo", align_policy)):
            run = out / f"{name}_s{rs}"
            after = ("eval-sft",) if name == "sft_grpo" else ("eval-sft", "discriminator")
            lane = Lane(f"{name}-{rs}", after=after).add(
                f"{name}-s{rs}", _prism("rl", "--algo", "grpo", "--config", "configs/quickstart/rl.yaml",
                                        f"model.path={start}", f"data.train={rl_data}", f"output_dir={run}",
                                        f"train.steps={s.grpo_steps}", f"train.seed={rs}"),
                run / "final" / "config.json")
            lane.add(*_eval(f"eval-{name}-s{rs}", run / "final", test, out / "eval" / f"{name}_s{rs}", s.eval_limit))
            rl_lanes.append(lane)
    return [prep, warm, eval_sft, *rl_lanes]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{100 * m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def results_table(out: Path, seeds: list[int]) -> str:
    """METHOD.md section 9 at toy scale: held-out accuracy per task family, average, format, tokens."""
    def held(run: str) -> dict | None:
        return _load(_heldout_summary(out / "eval" / run, out / "data" / "test.parquet"))

    rows = [("SFT", [held("sft")]),
            ("SFT+GRPO", [held(f"sft_grpo_s{s}") for s in seeds]),
            ("PRISM (aligned)", [held("aligned")]),
            ("PRISM+GRPO", [held(f"prism_grpo_s{s}") for s in seeds])]
    tasks = sorted({t for _, ss in rows for s in ss if s for t in s["per_task"]})
    head = ["pipeline", *tasks, "avg", "format", "resp tokens", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, summaries in rows:
        ss = [s for s in summaries if s]
        if not ss:
            continue
        cells = [name] + [_mean_std([s["per_task"][t]["accuracy"] for s in ss if t in s["per_task"]]) for t in tasks]
        cells += [_mean_std([s["overall"]["accuracy"] for s in ss]), _mean_std([s["overall"]["format_rate"] for s in ss]),
                  f"{statistics.mean(s['overall']['mean_response_tokens'] for s in ss):.0f}", str(len(ss))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARKER = ".prism-quickstart"   # written into every quick start output folder; --fresh deletes only those


def claim_output(out: Path) -> None:
    """Create ``out`` and mark it as a quick start output folder (what ``--fresh`` may delete).
    A folder holding other things is refused, so that the marker never lands on a folder the
    quick start did not make; one that an earlier version's quick start wrote (``logs/`` and
    ``data/stats.json``, no marker yet) is marked and continued."""
    marker = out / MARKER
    if out.is_dir() and not marker.exists() and any(out.iterdir()) and not _earlier_output(out):
        raise ConfigError(f"--out {out}: the folder holds other things and is not a quick start output (no {MARKER} "
                          "file); choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "prism quickstart", "note": "prism quickstart --fresh deletes this "
                                      "folder; it deletes only folders holding this file"}) + "\n")


def _earlier_output(out: Path) -> bool:
    """An output of a quick start from before the marker: ``logs/`` and ``data/stats.json``,
    and nothing but what a quick start writes."""
    known = {"data", "tiny", "sft", "logs", "disc", "align", "eval", "results.md"}
    ours = all(p.name in known or re.fullmatch(r"(sft|prism)_grpo_s\d+", p.name) for p in out.iterdir())
    return ours and (out / "logs").is_dir() and (out / "data" / "stats.json").is_file()


def clear_output(out: Path) -> None:
    """``--fresh``: delete ``out`` when it is a quick start's output (it holds :data:`MARKER`, or
    is an earlier version's output) or empty; anything else is refused with
    :class:`~prism_rl.config.ConfigError`, untouched."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--fresh: {out} is not a folder (a file or a link); not deleting it")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not (out / MARKER).is_file() and not _earlier_output(out):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--fresh: {out} is not a quick start output folder (no {MARKER} file; it holds {shown}); "
                          "not deleting it. Choose another --out, or delete the folder yourself")
    shutil.rmtree(out)


def run_quickstart(out: str | Path = "runs/quickstart", seed: int = 0, overrides: list[str] | None = None,
                   fresh: bool = False) -> str:
    """Run (or continue) the quick start; returns the results table (also in results.md)."""
    s = load_config(QuickstartSettings, None, overrides or [])
    out = Path(out)
    if fresh:
        clear_output(out)
    claim_output(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_lanes(plan(out, s, seed), logs, s.workers)
    for run in ["sft", "align", "disc/warmup", *(f"{n}_s{r}" for r in s.rl_seeds for n in ("sft_grpo", "prism_grpo"))]:
        if (out / run / "metrics.jsonl").exists():
            from .plots import plot_run
            plot_run(out / run)
    wall = time.time() - t0
    table = results_table(out, s.rl_seeds)
    filt = _load(out / "data" / "rl.stats.json") or {}
    warm = _load(out / "disc" / "warmup" / "summary.json") or {}
    text = (f"# prism quickstart results\n\n{table}\n\n"
            f"Held-out test problems, greedy decoding. ± is the standard deviation over RL seeds {s.rl_seeds}.\n"
            f"RL problem set: {filt.get('kept', '?')} of {filt.get('input', '?')} alignment-pool problems kept by the "
            f"difficulty filter (pass rate in [{s.filter_low}, {s.filter_high}] over {s.filter_n} samples).\n"
            f"Discriminator warm-up, held-out pair accuracy (caption / reasoning): "
            f"{warm.get('after', {}).get('heldout_cap_acc', float('nan')):.2f} / "
            f"{warm.get('after', {}).get('heldout_reason_acc', float('nan')):.2f}\n"
            f"Wall time of this invocation: {wall / 60:.1f} min\n")
    (out / "results.md").write_text(text)
    print("\n" + text)
    return text
