"""What the stage-2 study (issue 16) runs: presets, arms, and the job graph of ``prism`` commands.

An *arm* is one pipeline whose final policy is evaluated on the shared held-out set:

* ``sft``                     the SFT policy;
* ``aligned``                 SFT -> adversarial alignment (MoE discriminator, learned routing);
* ``grpo`` / ``dapo`` / ``gspo``  SFT -> RL for ``align_steps + rl_steps`` steps (the baseline);
* ``prism_<algo>``            SFT -> ``align_steps`` alignment -> ``rl_steps`` RL (matched compute:
  an alignment step, at the same prompts x samples per step, costs one RL step);
* ``prism_grpo_<variant>``    the same with a discriminator ablation: ``segment`` routing,
  ``dense`` (no upcycling), ``textonly`` (never sees the image), ``nowarmup`` (the upcycled
  discriminator aligned against without warm-up);
* ``sft_varied`` / ``grpo_varied`` / ``prism_grpo_varied``: the control, on data whose public
  demonstrations are in other templates than the teacher's (style-mismatched);
* ``aligned_content`` / ``prism_<algo>_content``: ``aligned`` / ``prism_<algo>`` against the
  ``content`` discriminator: the same MoE init, warmed up not on the SFT policy's samples but on
  pairs that differ in content only (the teacher's demonstration against a public one with one
  perception or reasoning slip, in the teacher's template), from a second synthetic pool
  (``data/content``, ``bench/disc_probe.py --write-pairs``).

Every seed has its own tiny model init, SFT, warm-up pairs, discriminators and RL runs; the
data (and so the held-out problems) are shared by all seeds and arms, which makes the
comparison paired per problem. The content pool and its pairs are data too: shared by all seeds.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

ALGOS = ("grpo", "dapo", "gspo")
DISC_VARIANTS = {"moe": [], "segment": ["--routing", "segment"], "dense": ["--dense"], "textonly": ["--text-only"]}
ABLATIONS = ("segment", "dense", "textonly", "nowarmup")
INIT_OF = {"nowarmup": "moe", "content": "moe", "content_dense": "dense"}   # variants that reuse another's init
CONTENT = ("content", "content_dense")   # warmed up on the content pool's slip-only pairs
CONFIGS = Path("configs/quickstart")
BENCH = Path(__file__).resolve().parent

# The synthetic pools (``prism data synth``): seed, teacher share of the SFT problems, public slip
# rate (None: the preset's) and public style. ``content`` is another draw than the study's
# (seed 1) in which every SFT problem has the teacher's demonstration and a public one with one
# slip in the teacher's template, so that its pairs differ in content and in nothing else.
POOLS = {"matched": (0, None, None, "teacher"), "varied": (0, None, None, "varied"),
         "content": (1, 1.0, 1.0, "teacher")}


@dataclass(frozen=True)
class Arm:
    """One pipeline: its data (``matched`` | ``varied``), whether it aligns (and against which
    discriminator), and its RL algorithm (``None``: evaluated without RL)."""

    name: str
    data: str = "matched"
    disc: str | None = None   # moe | segment | dense | textonly | nowarmup | content | content_dense
    algo: str | None = None


def _arms() -> dict[str, Arm]:
    arms = [Arm("sft"), Arm("aligned", disc="moe")]
    for algo in ALGOS:
        arms += [Arm(algo, algo=algo), Arm(f"prism_{algo}", disc="moe", algo=algo)]
    arms += [Arm(f"prism_grpo_{v}", disc=v, algo="grpo") for v in ABLATIONS]
    arms += [Arm("sft_varied", data="varied"), Arm("grpo_varied", data="varied", algo="grpo"),
             Arm("prism_grpo_varied", data="varied", disc="moe", algo="grpo")]
    for v in CONTENT:
        arms += [Arm(f"aligned_{v}", disc=v)] + [Arm(f"prism_{algo}_{v}", disc=v, algo=algo) for algo in ALGOS]
    return {a.name: a for a in arms}


ARMS = _arms()
DEFAULT_ARMS = ("sft", "aligned", "grpo", "prism_grpo", "dapo", "prism_dapo", "gspo", "prism_gspo")


@dataclass(frozen=True)
class Preset:
    """Sizes of one study. ``spec``: ``TinySpec`` overrides (``prism model tiny --spec``)."""

    problems: int
    test_frac: float
    align_frac: float
    teacher_frac: float
    public_error_rate: float
    spec: dict
    sft: list[str]             # overrides of configs/quickstart/sft.yaml
    pairs_limit: int           # alignment prompts the SFT policy is sampled on for warm-up pairs
    min_pairs: int             # fewer valid policy samples than this: public demonstrations fill up
    warmup: list[str]
    align_steps: int
    rl_steps: int
    prompts_per_step: int
    samples: int
    max_new_tokens: int
    micro_batch: int
    disc_batch: int
    eval_batch: int
    eval_limit: int | None
    procs_per_gpu: int
    threads: int
    eval_reserve_min: float    # the end of the budget kept for evaluations
    budget_min: float
    probe_limit: int = 150     # pairs per slip kind in each discriminator's probe (disc_probe.py)
    pairs_n: int = 1           # samples per prompt for warm-up pairs (pairs_limit x pairs_n samples)


PRESETS = {
    # 2 cores, a minute or two: every stage runs, nothing is learnt.
    "cpu-smoke": Preset(
        problems=96, test_frac=0.25, align_frac=0.3, teacher_frac=0.2, public_error_rate=0.3, spec={},
        sft=["train.max_steps=8", "train.batch_size=8"], pairs_limit=12, min_pairs=12,
        warmup=["train.max_steps=2", "train.batch_size=8", "train.heldout_frac=0.25"],
        align_steps=1, rl_steps=1, prompts_per_step=2, samples=4, max_new_tokens=40, micro_batch=8,
        disc_batch=8, eval_batch=8, eval_limit=6, procs_per_gpu=1, threads=1, eval_reserve_min=2.0, budget_min=10.0,
        probe_limit=8),
    # 2 cores, about an hour for 2 seeds of the core arms, the control and the ablations: the quick
    # start's model (~0.74M parameters) and lengths, the study's data shape, 8 prompts x 8 samples.
    "cpu": Preset(
        problems=6000, test_frac=0.15, align_frac=0.2, teacher_frac=0.2, public_error_rate=0.3, spec={},
        sft=["train.epochs=4"], pairs_limit=448, min_pairs=64, warmup=[],
        align_steps=20, rl_steps=30, prompts_per_step=8, samples=8, max_new_tokens=160, micro_batch=64,
        disc_batch=64, eval_batch=64, eval_limit=448, procs_per_gpu=1, threads=1, eval_reserve_min=5.0,
        budget_min=75.0),
    # 2 H200s, about 7 minutes: a ~22.5M-parameter Qwen3-VL, RL at the spec's 32 prompts x 16 samples
    # (sizes estimated in docs/RESULTS.md, "Stage-2 study"). 160 new tokens: at 128 (the runs of
    # 2026-12-01) about 10% of the arith demonstrations, teacher's included, did not fit (up to 147
    # tokens), so their reward could not fire and RL gained by learning to be short.
    "gpu": Preset(
        problems=20000, test_frac=0.15, align_frac=0.2, teacher_frac=0.2, public_error_rate=0.3,
        spec={"vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "mrope_section": [8, 12, 12],
              "vision_hidden_size": 256, "vision_intermediate_size": 768, "vision_depth": 2, "vision_heads": 4},
        sft=["train.epochs=2", "train.batch_size=128", "optim.lr=1e-3", "train.log_every=20"], pairs_limit=2048,
        min_pairs=256, warmup=["train.epochs=2", "train.batch_size=64", "disc.batch_size=128"],
        align_steps=6, rl_steps=12, prompts_per_step=32, samples=16, max_new_tokens=160, micro_batch=128,
        disc_batch=128, eval_batch=512, eval_limit=None, procs_per_gpu=8, threads=2, eval_reserve_min=1.5,
        budget_min=7.0, pairs_n=4),   # 8,192 warm-up samples: 1,024 taught the first run's discriminators nothing
}


@dataclass
class Job:
    """One ``prism`` command. ``done``: the file that exists once it has finished (a rerun skips
    it); ``arms``: the arms whose cost it counts to; ``stoppable``: a training run that the
    budget may stop early (SIGTERM: it saves a checkpoint at its current step)."""

    name: str
    argv: list[str]
    done: Path
    deps: list[str] = field(default_factory=list)
    gpu: bool = True
    arms: set[str] = field(default_factory=set)
    stoppable: bool = False
    priority: int = 0
    source: tuple[str, Path] | None = None   # (stage kind, folder): "{policy}" in argv becomes its policy
    out_dir: Path | None = None              # the job's output folder (a training run's checkpoints)


def prism(threads: int, *args) -> list[str]:
    return [sys.executable, "-m", "prism_rl.cli", "--threads", str(threads), *map(str, args)]


def eval_dir(out: Path, arm: str, seed: int) -> Path:
    """Where ``prism eval`` writes the arm's held-out rows (run ``<arm>_s<seed>``)."""
    return out / "eval" / f"{arm}_s{seed}" / "heldout-test"


class Planner:
    """Builds the job graph for ``arms`` x ``seeds`` (shared stages are planned once)."""

    def __init__(self, out: Path, p: Preset, arms: list[str], seeds: list[int], overrides: dict[str, list[str]],
                 gpus: int = 0):
        self.out, self.p, self.seeds, self.ov, self.gpus = out, p, seeds, overrides, gpus
        self.arms = [ARMS[a] for a in arms]
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job, arm: str) -> str:
        if job.name not in self.jobs:
            self.jobs[job.name] = job
        self.jobs[job.name].arms.add(arm)
        self.jobs[job.name].priority = min(self.jobs[job.name].priority, job.priority)
        return job.name

    def _x(self, stage: str) -> list[str]:
        return self.ov.get(stage, [])

    def data(self, v: str, arm: str) -> str:
        """The synthetic pool ``v`` of ``POOLS``, at the preset's size and splits."""
        p, d = self.p, self.out / "data" / v
        seed, teacher, slips, style = POOLS[v]
        argv = prism(1, "data", "synth", "--out", d, "--n", p.problems, "--seed", seed, "--test-frac", p.test_frac,
                     "--align-frac", p.align_frac, "--teacher-frac", p.teacher_frac if teacher is None else teacher,
                     "--public-error-rate", p.public_error_rate if slips is None else slips, "--public-style", style)
        return self.add(Job(f"data-{v}", argv, d / "stats.json", gpu=False), arm)

    def sft(self, v: str, s: int, arm: str, prio: int) -> str:
        p, d, root = self.p, self.out / "data" / v, self.out / f"s{s}" / v
        dep = self.data(v, arm)
        spec = json.dumps({**p.spec, "seed": s})
        tiny = self.add(Job(f"tiny-{v}-s{s}", prism(1, "model", "tiny", "--out", root / "tiny", "--data", d,
                                                    "--spec", spec), root / "tiny" / "config.json", [dep], gpu=False), arm)
        argv = prism(p.threads, "sft", "--config", CONFIGS / "sft.yaml", f"model.path={root / 'tiny'}",
                     f"data.train={d / 'sft.json'}", f"output_dir={root / 'sft'}", f"train.seed={s}", *p.sft,
                     *self._x("sft"))
        return self.add(Job(f"sft-{v}-s{s}", argv, root / "sft" / "final" / "config.json", [tiny], priority=prio), arm)

    def disc(self, v: str, s: int, variant: str, arm: str, prio: int) -> tuple[str, Path]:
        """The discriminator the alignment plays against: warmed up on the SFT policy's pairs, on
        the content pool's (``content``), or (``nowarmup``) just upcycled."""
        p, root = self.p, self.out / f"s{s}" / v
        sft = self.sft(v, s, arm, prio)
        kind = INIT_OF.get(variant, variant)
        init = root / "disc" / kind / "init"
        init_job = self.add(Job(f"disc-init-{kind}-{v}-s{s}", prism(1, "disc", "init", "--from", root / "sft" / "final",
                                                                     "--out", init, "--seed", s, *DISC_VARIANTS[kind]),
                                init / "prism_discriminator.json", [sft], gpu=False, priority=prio), arm)
        if variant == "nowarmup":
            self.probe(v, s, variant, init_job, init, arm)
            return init_job, init
        if variant in CONTENT:
            pairs, pairs_file = self.content_pairs(arm)
        else:
            pairs, pairs_file = self.add(self._pairs(v, s, sft, prio), arm), root / "pairs.jsonl"
        warm = root / "disc" / variant / "warmup"
        argv = prism(p.threads, "disc", "warmup", "--config", CONFIGS / "warmup.yaml", f"disc.path={init}",
                     f"data.train={pairs_file}", f"output_dir={warm}", f"train.seed={s}", *p.warmup,
                     *self._x("warmup"))
        job = self.add(Job(f"warmup-{variant}-{v}-s{s}", argv, warm / "final" / "prism_discriminator.json",
                           [init_job, pairs], priority=prio), arm)
        self.probe(v, s, variant, job, warm / "final", arm)
        return job, warm / "final"

    def probe(self, v: str, s: int, variant: str, dep: str, disc: Path, arm: str) -> None:
        """What the discriminator that alignment will play against rewards, measured on the
        study's own pool (``disc_probe.py``: teacher vs public demonstrations of one problem,
        grouped by the public one's slip: none, perception, reasoning). Analysis only: no stage
        waits for it. With GPUs it takes a GPU slot like any stage (on the CPU, three probes of
        the 22.5M model at every core's thread starved the GPU jobs of one H200 machine and did not
        finish in 14 min); on a CPU study it runs beside the workers on ``threads`` threads."""
        folder = self.out / f"s{s}" / v / "disc" / variant
        argv = [sys.executable, BENCH / "disc_probe.py", "--disc", disc, "--data", self.out / "data" / v / "sft.json",
                "--name", f"{v}/{variant}", "--limit", self.p.probe_limit, "--threads", self.p.threads,
                "--out", folder / "probe.json"]
        self.add(Job(f"probe-{variant}-{v}-s{s}", list(map(str, argv)), folder / "probe.json", [dep],
                     gpu=self.gpus > 0), arm)

    def content_pairs(self, arm: str) -> tuple[str, Path]:
        """The content discriminator's warm-up pairs, one file for every seed: the content pool's
        teacher demonstrations against its slipped public ones (``disc_probe.py --write-pairs``;
        its report of what was written and skipped, written last, marks the job done)."""
        d = self.out / "data" / "content"
        dep = self.data("content", arm)
        argv = [sys.executable, BENCH / "disc_probe.py", "--data", d / "sft.json", "--write-pairs", d / "pairs.jsonl",
                "--out", d / "pairs.report.json"]
        job = Job("pairs-content", list(map(str, argv)), d / "pairs.report.json", [dep], gpu=False)
        return self.add(job, arm), d / "pairs.jsonl"

    def _pairs(self, v: str, s: int, sft: str, prio: int) -> Job:
        """Warm-up pairs: the teacher's segments against the SFT policy's samples (``prism disc
        pairs``). When the policy closes the format in fewer than ``min_pairs`` samples (the CPU
        smoke's few-step SFT never does), public demonstrations are added as students
        (:func:`top_up_pairs`; ``pairs.topup.json`` says how many, and the report shows it)."""
        p, d, root = self.p, self.out / "data" / v, self.out / f"s{s}" / v
        argv = prism(p.threads, "disc", "pairs", "--policy", root / "sft" / "final", "--data", d / "align.parquet",
                     "--out", root / "pairs.jsonl", "--max-new-tokens", p.max_new_tokens, "--limit", p.pairs_limit,
                     "--n", p.pairs_n, "--seed", s, "--batch-prompts", max(1, p.eval_batch // p.pairs_n))
        code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); from stage2_plan import "
                f"top_up_pairs; top_up_pairs({str(root / 'pairs.jsonl')!r}, {str(d / 'align.parquet')!r}, "
                f"{p.pairs_limit}, {p.min_pairs})")
        chain = " && ".join(" ".join(map(shlex.quote, map(str, c))) for c in (argv, [sys.executable, "-c", code]))
        return Job(f"pairs-{v}-s{s}", ["sh", "-c", chain], root / "pairs.topup.json", [sft], priority=prio)

    def align(self, v: str, s: int, variant: str, arm: str, prio: int) -> tuple[str, Path]:
        p, d, root = self.p, self.out / "data" / v, self.out / f"s{s}" / v
        dep, disc = self.disc(v, s, variant, arm, prio)
        out = root / "align" / variant
        argv = prism(p.threads, "align", "--config", CONFIGS / "align.yaml", f"model.path={root / 'sft' / 'final'}",
                     f"disc.path={disc}", f"data.train={d / 'align.parquet'}", f"output_dir={out}",
                     f"train.steps={self.p.align_steps}", f"train.seed={s}", f"rollout.prompts_per_step={p.prompts_per_step}",
                     f"rollout.n={p.samples}", f"rollout.max_new_tokens={p.max_new_tokens}",
                     f"ppo.micro_batch_size={p.micro_batch}", f"disc.batch_size={p.disc_batch}", *self._x("align"))
        job = Job(f"align-{variant}-{v}-s{s}", argv, out / "final" / "policy" / "config.json", [dep], stoppable=True,
                  priority=prio, out_dir=out)
        return self.add(job, arm), out

    def rl(self, arm: Arm, s: int, start: Path, dep: str, steps: int, prio: int,
           align_out: Path | None = None) -> tuple[str, Path]:
        p, d = self.p, self.out / "data" / arm.data
        out = self.out / f"s{s}" / arm.data / "rl" / arm.name
        argv = prism(p.threads, "rl", "--algo", arm.algo, "--config", CONFIGS / "rl.yaml", f"model.path={start}",
                     f"data.train={d / 'align.parquet'}", f"data.eval={d / 'test.parquet'}", f"output_dir={out}",
                     f"train.steps={steps}", f"train.seed={s}", f"rollout.prompts_per_step={p.prompts_per_step}",
                     f"rollout.n={p.samples}", f"rollout.max_new_tokens={p.max_new_tokens}",
                     f"algo.micro_batch_size={p.micro_batch}", *self._x("rl"), *self._x(arm.algo))
        job = Job(f"rl-{arm.name}-s{s}", argv, out / "final" / "config.json", [dep], stoppable=True, priority=prio,
                  out_dir=out)
        if align_out is not None:   # starts from the aligned policy, or its last checkpoint when the budget cut it
            job.source = ("align", align_out)
        return self.add(job, arm.name), out

    def arm(self, arm: Arm, s: int, prio: int) -> None:
        """The jobs of one arm and seed, ending in its evaluation (whose argv gets the policy
        folder when it starts: a run stopped by the budget is evaluated at its last checkpoint)."""
        p, v = self.p, arm.data
        sft_dir = self.out / f"s{s}" / v / "sft" / "final"
        if arm.disc is not None:
            dep, align_out = self.align(v, s, arm.disc, arm.name, prio)
            start, steps = Path("{policy}"), p.rl_steps
            source = ("align", align_out)
        else:
            dep, start, steps = self.sft(v, s, arm.name, prio), sft_dir, p.align_steps + p.rl_steps
            source = ("sft", sft_dir)
        if arm.algo is not None:
            dep, rl_out = self.rl(arm, s, start, dep, steps, prio, source[1] if arm.disc else None)
            source = ("rl", rl_out)
        ev = eval_dir(self.out, arm.name, s)
        argv = prism(p.threads, "eval", "--config", CONFIGS / "eval.yaml", "--model", "{policy}", "--data",
                     self.out / "data" / v / "test.parquet", "--out", self.out / "eval", "--name", f"{arm.name}_s{s}",
                     "--max-new-tokens", p.max_new_tokens, f"generation.batch_size={p.eval_batch}",
                     *([f"data.limit={p.eval_limit}"] if p.eval_limit else []), *self._x("eval"))
        self.add(Job(f"eval-{arm.name}-s{s}", argv, ev / "summary.json", [dep], priority=prio, source=source,
                     out_dir=ev.parent), arm.name)

    def plan(self) -> dict[str, Job]:
        for prio, arm in enumerate(self.arms):
            for s in self.seeds:
                self.arm(arm, s, prio)
        return self.jobs


UP_TO_PROBES = ("data-", "tiny-", "sft-", "disc-init-", "pairs-", "warmup-", "probe-")


def up_to_probes(jobs: dict[str, Job]) -> dict[str, Job]:
    """The jobs the arms' discriminators need, up to their warm-ups and probes: no alignment,
    RL or evaluation (``stage2_study.py --probes-only``: what each discriminator rewards, at a
    fraction of the study's cost)."""
    return {n: j for n, j in jobs.items() if n.startswith(UP_TO_PROBES)}


def resolve_policy(kind: str, out: Path) -> tuple[Path | None, int | None]:
    """The policy folder a stage left, and the step it stopped at: ``(final, None)`` when it
    finished, else the newest checkpoint (a run stopped by the budget) and its step; ``(None,
    None)`` when there is neither."""
    if kind == "sft":
        return (out, None) if (out / "config.json").exists() else (None, None)
    sub = "policy" if kind == "align" else ""
    final = out / "final" / sub if sub else out / "final"
    if (final / "config.json").exists():
        return final, None
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]) if c.name.split("-")[1].isdigit()
                   else -1)
    for c in reversed(ckpts):
        pol = c / sub if sub else c
        if (pol / "config.json").exists():
            return pol, int(c.name.split("-")[1])
    return None, None


def top_up_pairs(pairs: str, align_parquet: str, limit: int, min_pairs: int) -> dict:
    """Append public-demonstration pairs to ``pairs`` until it holds ``min_pairs`` (the first
    ``limit`` alignment problems are the candidates); writes and returns ``{"policy_pairs",
    "public_pairs_added"}`` to ``pairs.topup.json`` beside it."""
    import tempfile

    from prism_rl.data.layouts import read_records
    from prism_rl.data.pairs import build_pairs

    path = Path(pairs)
    have = path.read_text().splitlines() if path.exists() else []
    need = max(0, min_pairs - len(have))
    added: list[str] = []
    if need:
        recs = read_records(align_parquet)[:limit][:need]
        with tempfile.TemporaryDirectory() as tmp:
            samples, built = Path(tmp) / "samples.jsonl", Path(tmp) / "pairs.jsonl"
            samples.write_text("".join(json.dumps({"id": r.id, "response": r.extra["public_response"]}) + "\n"
                                       for r in recs))
            build_pairs(align_parquet, samples, built)
            added = built.read_text().splitlines()
        path.write_text("".join(line + "\n" for line in have + added))
    info = {"policy_pairs": len(have), "public_pairs_added": len(added)}
    path.with_suffix(".topup.json").write_text(json.dumps(info) + "\n")
    return info


def planned_steps(p: Preset, arm: Arm) -> dict[str, int]:
    """Alignment and RL steps the arm is planned to take (matched compute: equal totals)."""
    if arm.algo is None:
        return {"align": p.align_steps if arm.disc else 0, "rl": 0}
    return {"align": p.align_steps, "rl": p.rl_steps} if arm.disc else {"align": 0, "rl": p.align_steps + p.rl_steps}


def with_steps(p: Preset, align_steps: int | None, rl_steps: int | None, budget: float | None) -> Preset:
    return replace(p, align_steps=align_steps or p.align_steps, rl_steps=rl_steps or p.rl_steps,
                   budget_min=budget or p.budget_min)
