"""Training interrupted for real: SIGTERM, SIGINT and SIGKILL sent to `prism` processes.

Every run here is a subprocess of the CLI (one torch thread, the tiny model, a few steps), and
every interruption is triggered by watching the process: the test waits until
``metrics.jsonl`` shows a step (or a checkpoint folder appears), then sends the signal.

- SIGTERM or SIGINT: the process finishes the step in progress, saves a checkpoint, exits 0
  with one line; resumed to the end, the run's final weights equal an uninterrupted run's bit
  for bit and ``metrics.jsonl`` holds every step once.
- A second signal: exit 128 + signal at once, one line, no traceback, nothing new saved.
- SIGKILL at seeded random points, right after a checkpoint and between checkpoints, several
  times in one run: resumed to the end, the final weights equal the uninterrupted run's.

Marked slow (about 3.5 minutes of CPU in all: ~30 processes, most of it their start-up);
``-m "not slow"`` deselects them, ``-rP`` shows the kill points and stop steps they print.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prism_rl
from prism_rl.cli import main

from conftest import CONFIGS

pytestmark = pytest.mark.slow

QUICKSTART = CONFIGS / "quickstart"
SRC = Path(prism_rl.__file__).resolve().parents[1]   # the sources under test, for the subprocesses
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = {"sft": 12, "rl": 8, "align": 8, "warmup": 8}
SAVE_EVERY = 3
FINAL = {"sft": "final model", "rl": "final policy", "align": "aligned policy", "warmup": "warmed-up discriminator"}


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (between the pytest-xdist workers of one session)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Synthetic data, the tiny model, a discriminator made from it and warm-up pairs; built
    once per session, in a folder the xdist workers share (the uninterrupted runs are too)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "interrupt"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("interrupt")
    with locked(root / ".lock"):
        if not (root / "ready").exists():
            build_inputs(root)
            (root / "ready").touch()
    return root


def build_inputs(root: Path) -> None:
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--n", "80", "--seed", "3"]) == 0
    assert main(["model", "tiny", "--out", str(root / "tiny"), "--data", str(data)]) == 0
    assert main(["disc", "init", "--from", str(root / "tiny"), "--out", str(root / "disc")]) == 0
    from prism_rl.data.layouts import read_records
    recs = read_records(data / "align.parquet")[:16]
    samples = root / "samples.jsonl"   # students: the teacher's demonstration with a wrong answer
    samples.write_text("".join(json.dumps({"id": r.id, "response": r.extra["teacher_response"].replace(
        f"<answer>\n{r.ground_truth}\n</answer>", "<answer>\n999\n</answer>")}) + "\n" for r in recs))
    assert main(["data", "build-pairs", "--curated", str(data / "align.parquet"), "--samples", str(samples),
                 "--out", str(root / "pairs.jsonl")]) == 0


def stage_args(stage: str, root: Path, out: Path) -> list[str]:
    """The command line of a small run of ``stage`` writing to ``out``: log every step, a
    checkpoint every ``SAVE_EVERY`` steps."""
    data, tiny = root / "data", root / "tiny"
    common = [f"output_dir={out}", "train.log_every=1", f"train.save_every={SAVE_EVERY}"]
    rollout = ["rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=24", f"train.steps={STEPS[stage]}"]
    if stage == "sft":
        return ["sft", "--config", str(QUICKSTART / "sft.yaml"), f"model.path={tiny}", f"data.train={data / 'sft.json'}",
                f"train.max_steps={STEPS[stage]}", "train.batch_size=4", "train.grad_accum=2",
                "optim.warmup_ratio=0.2", *common]
    if stage == "rl":
        return ["rl", "--algo", "grpo", "--config", str(QUICKSTART / "rl.yaml"), f"model.path={tiny}",
                f"data.train={data / 'align.parquet'}", *rollout, *common]
    if stage == "align":
        return ["align", "--config", str(QUICKSTART / "align.yaml"), f"model.path={tiny}", f"disc.path={root / 'disc'}",
                f"data.train={data / 'align.parquet'}", *rollout, *common]
    return ["disc", "warmup", "--config", str(QUICKSTART / "warmup.yaml"), f"disc.path={root / 'disc'}",
            f"data.train={root / 'pairs.jsonl'}", f"train.max_steps={STEPS[stage]}", "train.batch_size=4",
            "train.heldout_frac=0.25", *common]


class Prism:
    """One ``prism`` process; stdout and stderr go to files (a full pipe would block it)."""

    def __init__(self, args: list[str], out: Path, tag: str):
        out.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = out.parent / f"{out.name}.{tag}.out", out.parent / f"{out.name}.{tag}.err"
        self.metrics = out / "metrics.jsonl"
        self.t0 = time.time()
        with self.stdout.open("w") as o, self.stderr.open("w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "prism_rl.cli", "--threads", "1", *args],
                                         stdout=o, stderr=e, env=ENV)

    def wait_until(self, ready, what: str, timeout: float = 120.0) -> None:
        """Poll ``ready()`` every 5 ms until it holds; fail if the process ends first."""
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"process ended (exit {self.proc.returncode}) before {what}: {self.tail()}"
            assert time.time() < deadline, f"no {what} after {timeout}s: {self.tail()}"
            time.sleep(0.005)

    def logged_step(self) -> int:
        """The highest step with a metrics row (not an event) so far."""
        steps = [r["step"] for r in _rows(self.metrics, torn_ok=True) if "event" not in r]
        return max(steps, default=0)

    def wait_for_step(self, k: int) -> None:
        self.wait_until(lambda: self.logged_step() >= k, f"step {k} in metrics.jsonl")

    def finish(self, timeout: float = 180.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.seconds = time.time() - self.t0
        return rc

    def out_lines(self) -> list[str]:
        return self.stdout.read_text().splitlines()

    def tail(self) -> str:
        return self.stderr.read_text()[-3000:] + self.stdout.read_text()[-1000:]


def _rows(path: Path, torn_ok: bool = False) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            assert torn_ok, f"{path}: a torn line: {line!r}"
    return rows


def run_to_end(stage: str, root: Path, out: Path, tag: str, resume: bool = True) -> Prism:
    p = Prism(stage_args(stage, root, out) + (["--resume"] if resume else []), out, tag)
    assert p.finish() == 0, p.tail()
    assert p.out_lines()[-1].startswith(FINAL[stage] + ": "), p.tail()
    return p


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder`` (policy and discriminator)."""
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys()
    differ = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not differ, f"final weights differ from the uninterrupted run's (max abs diff per tensor): {differ}"


def assert_each_step_logged_once(out: Path, stage: str) -> None:
    steps = [r["step"] for r in _rows(out / "metrics.jsonl") if "event" not in r]
    assert steps == list(range(1, STEPS[stage] + 1)), steps


@pytest.fixture(scope="module")
def straight(work):
    """``straight(stage)``: the final folder of an uninterrupted run (run once per stage)."""
    def get(stage: str) -> Path:
        out = work / f"{stage}_straight"
        with locked(work / f".{stage}.lock"):
            if not (out / "summary.json").exists():
                run_to_end(stage, work, out, "run", resume=False)
        return out / "final"
    return get


STOPPED = re.compile(r"stopped by (SIG\w+) after step (\d+), checkpoint: (.+) \(continue with --resume\)")


def stop_with(stage: str, root: Path, out: Path, sig: signal.Signals, at_step: int, resume: bool) -> int:
    """Start (or resume) a run, send ``sig`` once step ``at_step`` is logged (so it lands in a
    later step), and check the clean stop; returns the step the checkpoint holds."""
    p = Prism(stage_args(stage, root, out) + (["--resume"] if resume else []), out, sig.name)
    p.wait_for_step(at_step)
    p.proc.send_signal(sig)
    assert p.finish() == 0, p.tail()
    lines = p.out_lines()
    m = STOPPED.fullmatch(lines[-1]) if lines else None
    assert m and m.group(1) == sig.name, p.tail()
    step, ckpt = int(m.group(2)), Path(m.group(3))
    assert at_step <= step < STEPS[stage], p.tail()
    assert ckpt.name in (f"checkpoint-{step}", "policy") and ckpt.exists()
    assert "Traceback" not in p.stderr.read_text() and f"{sig.name} received" in p.stderr.read_text()
    print(f"{stage}: {sig.name} after step {at_step} was logged -> stopped after step {step} ({p.seconds:.1f}s)")
    return step


@pytest.mark.parametrize("stage", ["sft", "rl", "align", "warmup"])
def test_sigterm_and_sigint_stop_cleanly_and_resume_exactly(work, straight, stage):
    """SIGTERM in one attempt, SIGINT in the next, then to the end: the weights of a run never
    interrupted, every step logged once."""
    out = work / f"{stage}_signals"
    first = stop_with(stage, work, out, signal.SIGTERM, 2, resume=False)
    second = stop_with(stage, work, out, signal.SIGINT, first + 2, resume=True)
    assert second > first
    run_to_end(stage, work, out, "end")
    assert_same_weights(straight(stage), out / "final")
    assert_each_step_logged_once(out, stage)
    stops = [(r["signal"], r["step"]) for r in _rows(out / "metrics.jsonl") if r.get("event") == "stop"]
    assert stops == [("SIGTERM", first), ("SIGINT", second)]


def test_a_second_signal_stops_at_once(work):
    """SIGINT, then SIGTERM while the step finishes: exit 143 with one line, no traceback, no
    new checkpoint. The steps are made long (12 micro-batches each), so that the second signal
    comes before the first one's checkpoint is written (in the step, or right after it on a
    loaded machine)."""
    out = work / "sft_twice"
    p = Prism(stage_args("sft", work, out) + ["train.grad_accum=12"], out, "twice")
    p.wait_for_step(SAVE_EVERY + 1)
    before = sorted(x.name for x in out.glob("checkpoint-*"))
    p.proc.send_signal(signal.SIGINT)
    p.wait_until(lambda: "SIGINT received" in p.stderr.read_text(), "the notice of the first signal")
    p.proc.send_signal(signal.SIGTERM)
    assert p.finish() == 128 + signal.SIGTERM, p.tail()
    err = p.stderr.read_text()
    assert "Traceback" not in err and p.out_lines() == []
    last = err.strip().splitlines()[-1]
    # "in step N", or "after step N" when a loaded machine runs the step out before the signal lands
    assert re.fullmatch(rf"prism sft: stopped at once by a second SIGTERM (in|after) step \d+; nothing saved since "
                        rf"{re.escape(str(out))}/checkpoint-{SAVE_EVERY} \(continue with --resume\)", last), last
    assert before == [f"checkpoint-{SAVE_EVERY}"] and sorted(x.name for x in out.glob("checkpoint-*")) == before


def latest_checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    return max(steps, default=0)


def kill_at_random_points(stage: str, root: Path, out: Path, rng: random.Random, points: int) -> list[str]:
    """SIGKILL the run ``points`` times, resuming after each kill: even points right after a
    checkpoint appears, odd ones a random time after a random step between checkpoints (or
    after the last checkpoint). Returns a line per point (a run that ended before its kill
    says so)."""
    report = []
    for i in range(points):
        start = latest_checkpoint_step(out)
        p = Prism(stage_args(stage, root, out) + (["--resume"] if i else []), out, f"kill{i}")
        target = (start // SAVE_EVERY + 1) * SAVE_EVERY   # the next periodic checkpoint (none at the last step)
        if i % 2 == 0 and target < STEPS[stage]:   # right after the first checkpoint this attempt writes
            folder = out / f"checkpoint-{target}"
            p.wait_until(folder.exists, folder.name)
            delay, kind = rng.uniform(0, 0.05), "after checkpoint"
        else:            # a step past the last checkpoint, then a random fraction of a step
            target = min(start + rng.randint(1, SAVE_EVERY - 1), STEPS[stage] - 1)
            p.wait_for_step(target)
            delay, kind = rng.uniform(0, 0.15), "between checkpoints"
        time.sleep(delay)
        p.proc.kill()
        rc = p.finish()
        state = "killed" if rc == -signal.SIGKILL else f"ended first (exit {rc})"
        report.append(f"{kind}: step {target} + {delay * 1000:.0f} ms: {state}, {p.logged_step()} steps logged, "
                      f"newest checkpoint {latest_checkpoint_step(out)}")
    return report


@pytest.mark.parametrize("stage", ["sft", "rl", "align"])
def test_sigkill_at_random_points_resumes_exactly(work, straight, stage):
    """Three kill -9 per run (seeded points), then resumed to the end: the uninterrupted run's
    weights, every step logged once."""
    out = work / f"{stage}_killed"
    t0 = time.time()
    report = kill_at_random_points(stage, work, out, random.Random(f"issue15-{stage}"), points=3)
    run_to_end(stage, work, out, "end")
    killed = sum(": killed," in line for line in report)
    print(f"{stage}: {killed} of {len(report)} kill -9 points ran, {time.time() - t0:.0f}s:\n  " + "\n  ".join(report))
    assert killed >= 1
    assert_same_weights(straight(stage), out / "final")
    assert_each_step_logged_once(out, stage)
