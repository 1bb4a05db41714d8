"""The stage-2 study of issue 16: does adversarial alignment (PRISM's stage 2) repair the SFT
policy's perception so that PRISM + RL beats SFT + RL, at matched compute?

Runs every stage as a ``prism`` subprocess (the job graph of ``stage2_plan.py``), several per
GPU (the model is small), round-robin over ``--gpus`` devices, inside a wall-clock budget:
alignment and RL runs still going when ``budget - eval_reserve`` is reached get SIGTERM (they
save a checkpoint at their current step, which is evaluated and reported with its step);
what has not finished at the end of the budget is stopped and listed as not run. Then
``stage2_report.py`` writes ``results.json`` and ``results.md``. A rerun with the same
``--out`` skips every stage whose output exists.

    python bench/stage2_study.py --preset gpu --gpus 2 --seeds 0,1,2 --out runs/stage2 \\
        [--arms grpo,prism_grpo,...] [--budget-min 7] [--control] [--set rl:optim.lr=5e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage2_dynamics import dynamics, plot  # noqa: E402
from stage2_plan import ARMS, DEFAULT_ARMS, PRESETS, Job, Planner, resolve_policy, up_to_probes, with_steps  # noqa: E402
from stage2_report import write_report  # noqa: E402

from prism_rl.reward.math_verify_pool import MathVerifyUnavailable, run_math_verify  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START_FILE = "stage2_start.txt"   # beside a job's output: the policy folder it started from
KILL_GRACE_S = 90   # a stopped training run gets this long to save its checkpoint
OOM_RETRIES = 2     # a job that ran out of GPU memory is started again this many times at most
OOM_MARKERS = ("torch.OutOfMemoryError", "CUDA out of memory")


class Runner:
    """Runs jobs as their dependencies allow: at most ``procs_per_gpu`` per GPU (or ``workers``
    on the CPU), the longest remaining chains first, then the arms in ``--arms`` order. Records
    each job's status, wall time, GPU and GPU-share seconds (each second a job runs counts 1/k
    when k jobs share its GPU).

    A job that fails because its GPU ran out of memory (its log shows a CUDA OOM: several jobs
    sharing a card outgrew it, as eight warm-ups and RL runs at once did on one H200) is put
    back in the queue, up to ``OOM_RETRIES`` times, and that GPU then takes half as many jobs
    at once (at least one). The failed attempt's log is kept as ``logs/<job>.oom<k>.log`` and
    its GPU share still counts to the job's cost."""

    def __init__(self, jobs: dict[str, Job], out: Path, gpus: int, per_gpu: int, budget_s: float, reserve_s: float):
        self.jobs, self.out = jobs, out
        self.t0 = time.time()
        self.stop_training_at, self.end_at = self.t0 + budget_s - reserve_s, self.t0 + budget_s
        self.state: dict[str, dict] = {n: {"status": "pending"} for n in jobs}
        self.height = chain_lengths(jobs)   # longest chain of jobs after each: those start first
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if gpus and visible and len(visible) < gpus:
            raise SystemExit(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES lists only {len(visible)} ({','.join(visible)})")
        self.devices = visible[:gpus] if visible else [str(g) for g in range(gpus)]   # slot -> device id
        self.cap = {g: per_gpu for g in (range(gpus) if gpus else [-1])}   # jobs at once per device
        self.procs: dict[str, subprocess.Popen] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def _slots(self) -> list[int]:
        """Free device slots: GPU ids with room, least loaded first (``-1``: the CPU)."""
        load = {g: 0 for g in self.cap}
        for n in self.procs:
            if self.jobs[n].gpu:
                load[self.state[n]["gpu"]] += 1
        return sorted((g for g, k in load.items() if k < self.cap[g]), key=lambda g: load[g])

    def _ready(self) -> list[Job]:
        out = []
        for n, j in self.jobs.items():
            if self.state[n]["status"] != "pending":
                continue
            gone = [d for d in j.deps if self.state[d]["status"] in ("failed", "not run")]
            if gone:   # named, with its reason, so a report shows why an arm is missing
                d = self.state[gone[0]]
                self.state[n] = {"status": "not run", "why": f"{gone[0]} {d['status']}: {d.get('why', '?')}"[:600]}
            elif all(s in ("done", "stopped") for s in (self.state[d]["status"] for d in j.deps)):
                out.append(j)
        return sorted(out, key=lambda j: (-self.height[j.name], j.priority, j.name))

    def _argv(self, job: Job) -> list[str] | None:
        if job.source is None:
            return job.argv
        policy, step = resolve_policy(*job.source)
        if policy is None:
            return None
        self.state[job.name]["policy"], self.state[job.name]["policy_step"] = str(policy), step
        return [a.replace("{policy}", str(policy)) for a in job.argv]

    def _start(self, job: Job, gpu: int) -> None:
        before = self.state[job.name]   # a retried job's GPU share so far counts too: the lost work was spent
        st = self.state[job.name] = {"status": "running", "gpu": gpu, "start": time.time() - self.t0,
                                     "gpu_share_s": before.get("gpu_share_s", 0.0),
                                     **({"oom_retries": before["oom_retries"]} if "oom_retries" in before else {})}
        argv = self._argv(job)
        if argv is None:
            st.update(status="not run", why=f"no policy in {job.source[1]}")
            return
        if job.done.exists() and _same_start(job, st.get("policy")):   # finished by an earlier invocation
            st.update(status="done", skipped=True, wall_s=0.0)
            return
        if job.stoppable and time.time() >= self.stop_training_at:
            st.update(status="not run", why="budget: training time was over before it could start")
            return
        if job.source is not None and job.out_dir is not None and job.out_dir.exists() \
                and not _same_start(job, st.get("policy")):
            shutil.rmtree(job.out_dir)   # it started from another policy (one the budget had cut): redo it
        if job.source is not None and job.out_dir is not None:
            job.out_dir.mkdir(parents=True, exist_ok=True)
            (job.out_dir / START_FILE).write_text(st["policy"])
        if job.stoppable and job.out_dir is not None and any(job.out_dir.glob("checkpoint-*")):
            argv = [*argv, "--resume"]   # stopped by an earlier invocation's budget: continue it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": self.devices[gpu] if job.gpu and gpu >= 0 else "",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        log = (self.out / "logs" / f"{job.name}.log").open("w")
        log.write(" ".join(argv) + "\n")
        log.flush()
        self.procs[job.name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                                start_new_session=True)
        print(f"[{self._t()}] start {job.name} (gpu {gpu})", flush=True)

    def _t(self) -> str:
        return f"{(time.time() - self.t0) / 60:5.1f}m"

    def _reap(self) -> None:
        for n, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.procs[n]
            st, job = self.state[n], self.jobs[n]
            st["wall_s"] = time.time() - self.t0 - st["start"]
            st["rc"] = rc
            if job.done.exists():
                st["status"] = "done"
            elif job.stoppable and st.get("signalled"):
                st["status"] = "stopped"
            elif not st.get("signalled") and self._retry_after_oom(n):
                continue
            else:
                st["status"] = "not run" if st.get("signalled") else "failed"
                st["why"] = "stopped by the budget" if st.get("signalled") else \
                    f"exit {rc}, see logs/{n}.log" + error_line(self.out / "logs" / f"{n}.log")
                if st.get("oom_retries") and not st.get("signalled"):
                    st["why"] += f" (retried {st['oom_retries']} times after running out of GPU memory)"
            print(f"[{self._t()}] {st['status']} {n} ({st['wall_s']:.0f}s)", flush=True)

    def _retry_after_oom(self, n: str) -> bool:
        """Queue GPU job ``n`` again if its log shows a CUDA OOM and it has retries left, halving
        its GPU's job cap (at least 1)."""
        st, log = self.state[n], self.out / "logs" / f"{n}.log"
        k = st.get("oom_retries", 0)
        if not self.jobs[n].gpu or k >= OOM_RETRIES or not ran_out_of_gpu_memory(log):
            return False
        log.rename(log.with_name(f"{n}.oom{k + 1}.log"))
        g = st["gpu"]
        self.cap[g] = max(1, self.cap[g] // 2)
        self.state[n] = {"status": "pending", "oom_retries": k + 1, "gpu_share_s": st["gpu_share_s"]}
        print(f"[{self._t()}] out of GPU memory: {n} ({st['wall_s']:.0f}s); queued again (retry {k + 1} of "
              f"{OOM_RETRIES}), gpu {g} now takes at most {self.cap[g]} jobs at once", flush=True)
        return True

    def _signal(self, now: float) -> None:
        for n, proc in self.procs.items():
            st, job = self.state[n], self.jobs[n]
            late = now >= self.end_at or (job.stoppable and now >= self.stop_training_at)
            if late and not st.get("signalled"):
                st["signalled"] = now
                _killpg(proc, signal.SIGTERM)
            elif st.get("signalled") and now - st["signalled"] > KILL_GRACE_S:
                _killpg(proc, signal.SIGKILL)

    def _account(self, dt: float) -> None:
        by_gpu: dict[int, list[str]] = {}
        for n in self.procs:
            by_gpu.setdefault(self.state[n]["gpu"], []).append(n)
        for names in by_gpu.values():
            for n in names:
                self.state[n]["gpu_share_s"] += dt / len(names)

    def run(self) -> dict[str, dict]:
        """Run to the end of the budget; an interruption (Ctrl-C) stops every job it started."""
        try:
            return self._loop()
        except BaseException:
            for proc in self.procs.values():
                _killpg(proc, signal.SIGKILL)
            raise

    def _loop(self) -> dict[str, dict]:
        last = time.time()
        while True:
            now = time.time()
            self._account(now - last)
            last = now
            self._reap()
            self._signal(now)
            if now < self.end_at:
                for job in self._ready():
                    slots = self._slots() if job.gpu else [-1]
                    if not slots:
                        continue
                    self._start(job, slots[0])
            else:
                for st in self.state.values():
                    if st["status"] == "pending":
                        st.update(status="not run", why="budget spent before it could start")
            if not self.procs and not self._ready():
                break
            time.sleep(0.5)
        for st in self.state.values():
            if st["status"] == "pending":
                st.update(status="not run", why="a stage before it was not run")
        return self.state


def error_line(log: Path) -> str:
    """``: <the last "prism ...: error: ..." line of log>`` (cut to 400 characters), or "" when
    it has none: the reason a failed job gives in the report, e.g. a NonfiniteLogits message."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    found = [x.strip() for x in lines if ": error: " in x]
    return f": {found[-1][:400]}" if found else ""


def ran_out_of_gpu_memory(log: Path) -> bool:
    """Whether a job's log shows that CUDA ran out of memory (PyTorch's OutOfMemoryError)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return any(m in text for m in OOM_MARKERS)


def with_earlier_runs(previous: dict[str, dict], state: dict[str, dict]) -> dict[str, dict]:
    """This run's job states laid over an earlier run's in the same folder (its jobs.json): a
    stage this run reused (``skipped``) keeps the earlier record of what it cost, a job only the
    earlier run planned stays, and this run's clock starts where the earlier one ended, so the
    report's wall time and GPU-minutes count both runs (a rerun used to replace jobs.json, and
    a reused stage then counted 0 s)."""
    offset = max((st.get("start", 0.0) + st.get("wall_s", 0.0) for st in previous.values()), default=0.0)
    merged = dict(previous)
    for n, st in state.items():
        if not (st.get("skipped") and n in previous):
            merged[n] = {**st, "start": st["start"] + offset} if "start" in st else st
    return merged


def read_jobs(path: Path) -> dict[str, dict]:
    """A study folder's jobs.json ({} when there is none yet)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not a jobs.json this harness wrote ({e}); move it away to start afresh") from None


def chain_lengths(jobs: dict[str, Job]) -> dict[str, int]:
    """For each job, the number of jobs on the longest chain that waits for it (0 for a last
    job): starting the longest chains first shortens the whole study when slots are scarce."""
    after: dict[str, list[str]] = {n: [] for n in jobs}
    for n, j in jobs.items():
        for d in j.deps:
            after[d].append(n)
    memo: dict[str, int] = {}

    def height(n: str) -> int:
        if n not in memo:
            memo[n] = max((1 + height(m) for m in after[n]), default=0)
        return memo[n]

    return {n: height(n) for n in jobs}


def _same_start(job: Job, policy: str | None) -> bool:
    """Whether the output a job left came from ``policy`` (the folder its source resolved to
    now). A job without a source always does; one whose record is missing does not."""
    if job.source is None:
        return True
    marker = job.out_dir / START_FILE if job.out_dir is not None else None
    return marker is not None and marker.exists() and marker.read_text() == policy


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    """Signal the job's process group (a job may be a shell with children); gone is fine."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to spread the runs over (0: CPU)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--control", action="store_true", help="add the style-mismatched control arms (*_varied)")
    ap.add_argument("--budget-min", type=float, default=None, help="wall-clock budget of the whole study")
    ap.add_argument("--align-steps", type=int, default=None)
    ap.add_argument("--rl-steps", type=int, default=None)
    ap.add_argument("--procs-per-gpu", type=int, default=None)
    ap.add_argument("--probes-only", action="store_true",
                    help="run only what the arms' discriminators need, up to their warm-ups and probes")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite results.md/json from the folder's jobs.json (a study copied back "
                         "from another machine; give the arms, seeds, preset and --set of the run)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="extra override for a stage: sft, warmup, align, rl, grpo, dapo, gspo or eval")
    a = ap.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    if a.control:
        arms += [x for x in ("sft_varied", "grpo_varied", "prism_grpo_varied") if x not in arms]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(ARMS)})")
    overrides: dict[str, list[str]] = {}
    for item in a.set:
        stage, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            ap.error(f"--set {item!r}: expected STAGE:KEY=VALUE, e.g. rl:optim.lr=5e-5")
        overrides.setdefault(stage, []).append(kv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    preset = with_steps(PRESETS[a.preset], a.align_steps, a.rl_steps, a.budget_min)
    per_gpu = a.procs_per_gpu or (preset.procs_per_gpu if a.gpus else 2)
    out = Path(a.out).resolve()
    jobs = Planner(out, preset, arms, seeds, overrides, gpus=a.gpus).plan()
    if a.probes_only:
        jobs = up_to_probes(jobs)
    if a.report_only:
        saved = read_jobs(out / "jobs.json")
        if not saved:
            ap.error(f"--report-only: {out / 'jobs.json'} does not exist (no study has finished in {out})")
        print(write_report(out, preset, arms, seeds, {n: st for n, st in saved.items() if n in jobs}, jobs,
                           a.preset, a.gpus))
        return 0
    try:   # every RL, alignment and evaluation job scores with it: stop now, not minutes in
        run_math_verify("\\sqrt{4}", "2", 30.0)
    except MathVerifyUnavailable as e:
        ap.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    print(f"stage-2 study: preset {a.preset}, arms {', '.join(arms)}, seeds {seeds}, {len(jobs)} jobs, "
          f"{a.gpus or 'no'} GPUs x {per_gpu} processes, budget {preset.budget_min} min -> {out}", flush=True)
    previous = read_jobs(out / "jobs.json")
    state = Runner(jobs, out, a.gpus, per_gpu, preset.budget_min * 60, preset.eval_reserve_min * 60).run()
    state = {n: {**st, "arms": sorted(jobs[n].arms)} for n, st in state.items()}
    merged = with_earlier_runs(previous, state)
    (out / "jobs.json").write_text(json.dumps(merged, indent=1, default=str))
    md = write_report(out, preset, arms, seeds, {n: st for n, st in merged.items() if n in jobs}, jobs, a.preset,
                      a.gpus)
    curves = dynamics([out], seeds)
    if any(series["disc/cap_gap"]["step"] for series in curves.values()):
        plot(curves, out / "dynamics.png", f"stage-2 study {out.name}: alignment runs, mean over seeds (band: min-max)")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
