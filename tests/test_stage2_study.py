"""bench/stage2_study.py, the stage-2 study harness (issue 16): the paired bootstrap interval,
the job graph's matched compute and shared stages, the content discriminator's arms, and (slow)
a CPU run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, overflowing_copy, png_bytes, shadowed_math_verify_env

sys.path.insert(0, str(ROOT / "bench"))

from disc_probe import build_parser as probe_parser  # noqa: E402
from stage2_dynamics import alignment_runs, dynamics, plot, step_series  # noqa: E402
from stage2_plan import ARMS, PRESETS, Job, Planner, planned_steps, resolve_policy, up_to_probes  # noqa: E402
from stage2_report import comparisons, discriminator_probes, mean_std, paired_bootstrap_ci, paired_diffs, render, verdict  # noqa: E402
from stage2_study import START_FILE, Runner, _same_start, chain_lengths  # noqa: E402


def test_paired_bootstrap_ci_hand_checked():
    # every difference 1: every resample mean is 1
    assert paired_bootstrap_ci([1.0] * 5) == (1.0, 1.0, 1.0)
    # d = (0, 1): a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles of 4000 resamples are 0 and 1, and the 30% and 70% quantiles are 1/2
    mean, lo, hi = paired_bootstrap_ci([0.0, 1.0], n_boot=4000)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    _, lo50, hi50 = paired_bootstrap_ci([0.0, 1.0], n_boot=4000, level=0.4)
    assert lo50 == hi50 == 0.5
    # a clear shift: 200 problems, +1 on 150, 0 on 50 -> mean 0.75, CI inside (0.6, 0.9) and above 0
    mean, lo, hi = paired_bootstrap_ci([1.0] * 150 + [0.0] * 50)
    assert mean == 0.75 and 0.6 < lo < 0.75 < hi < 0.9
    assert paired_bootstrap_ci([1.0, 0.0, 1.0], seed=3) == paired_bootstrap_ci([1.0, 0.0, 1.0], seed=3)
    with pytest.raises(ValueError, match="no paired problems"):
        paired_bootstrap_ci([])


def test_paired_diffs_average_over_common_seeds_and_problems():
    a = {0: {"p1": {"acc": 1.0}, "p2": {"acc": 0.0}, "p3": {"acc": 1.0}}, 1: {"p1": {"acc": 1.0}, "p2": {"acc": 1.0}}}
    b = {0: {"p1": {"acc": 0.0}, "p2": {"acc": 0.0}, "p3": {"acc": 0.0}}, 1: {"p1": {"acc": 1.0}, "p2": {"acc": 0.0}},
         2: {"p1": {"acc": 0.0}}}
    diffs, seeds = paired_diffs(a, b, "acc")
    assert seeds == [0, 1] and diffs == [0.5, 0.5]   # p3 lacks seed 1; seed 2 lacks arm a
    assert paired_diffs(a, {5: {}}, "acc") == ([], [])
    assert mean_std([0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(0.1414, abs=1e-4)) and mean_std([0.5]) == (0.5, 0.0)
    assert verdict(0.01, 0.03, "acc").startswith("supported") and verdict(-0.2, -0.1, "acc").startswith("contradicted")
    assert verdict(-0.1, 0.1, "acc").startswith("not shown")


def _arg(argv: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(key + "="))


def test_plan_matches_compute_and_shares_stages(tmp_path):
    p = PRESETS["gpu"]
    arms = ["sft", "aligned", "grpo", "prism_grpo", "dapo", "prism_dapo", "prism_grpo_nowarmup", "grpo_varied"]
    jobs = Planner(tmp_path, p, arms, [0, 1], {"rl": ["optim.lr=5e-5"]}).plan()
    base, prism = jobs["rl-grpo-s1"], jobs["rl-prism_grpo-s1"]
    assert int(_arg(base.argv, "train.steps")) == p.align_steps + p.rl_steps
    assert int(_arg(prism.argv, "train.steps")) == p.rl_steps
    assert int(_arg(jobs["align-moe-matched-s1"].argv, "train.steps")) == p.align_steps
    for job in (base, prism, jobs["align-moe-matched-s1"]):   # alignment and RL steps see the same batch
        assert int(_arg(job.argv, "rollout.prompts_per_step")) == 32 and int(_arg(job.argv, "rollout.n")) == 16
    assert "optim.lr=5e-5" in base.argv and "--algo" in base.argv
    assert prism.source == ("align", tmp_path / "s1" / "matched" / "align" / "moe")
    # one alignment run per seed serves the aligned arm and every PRISM+RL arm; no warm-up for nowarmup
    assert jobs["align-moe-matched-s0"].arms == {"aligned", "prism_grpo", "prism_dapo"}
    assert _arg(jobs["align-nowarmup-matched-s0"].argv, "disc.path").endswith("disc/moe/init")
    assert jobs["sft-matched-s0"].arms >= {"sft", "grpo", "prism_grpo"} and "sft-varied-s0" in jobs
    assert "--public-style" in jobs["data-varied"].argv and "varied" in jobs["data-varied"].argv
    assert jobs["data-matched"].argv[jobs["data-matched"].argv.index("--public-style") + 1] == "teacher"
    pairs = jobs["pairs-matched-s1"].argv[2].split(" && ")[0].split()   # 2,048 prompts x 4 samples, 128 rows a call
    assert [pairs[pairs.index(k) + 1] for k in ("--limit", "--n", "--batch-prompts", "--seed")] == ["2048", "4", "128", "1"]
    assert planned_steps(p, ARMS["grpo"]) == {"align": 0, "rl": p.align_steps + p.rl_steps}
    assert planned_steps(p, ARMS["prism_dapo"]) == {"align": p.align_steps, "rl": p.rl_steps}
    assert all(d in jobs for j in jobs.values() for d in j.deps)
    h = chain_lengths(jobs)   # the PRISM chain (pairs, warm-up, alignment, RL, eval) starts before baseline RL
    assert (h["eval-grpo-s0"], h["rl-grpo-s0"], h["rl-prism_grpo-s0"], h["align-moe-matched-s0"]) == (0, 1, 1, 2)
    assert h["pairs-matched-s0"] == 4 > h["rl-grpo-s0"] and h["sft-matched-s0"] == 5
    assert [c[:2] for c in comparisons(arms)] == [("aligned", "sft"), ("prism_grpo", "grpo"), ("prism_dapo", "dapo"),
                                                   ("prism_grpo", "prism_grpo_nowarmup")]


def test_content_arms_run_the_content_pool_and_its_slip_pairs(tmp_path):
    """The content discriminator's arms at the cpu preset: the commands the one-off script of
    the first CPU study ran (its measured numbers are in docs/RESULTS.md), in the study's graph."""
    arms = ["prism_grpo", "aligned_content", "prism_grpo_content"]
    jobs = Planner(tmp_path, PRESETS["cpu"], arms, [0, 1], {"warmup": ["optim.lr=1e-4"]}).plan()
    d = tmp_path / "data" / "content"
    data = jobs["data-content"]
    assert data.argv[data.argv.index("data"):] == [
        "data", "synth", "--out", str(d), "--n", "6000", "--seed", "1", "--test-frac", "0.15", "--align-frac", "0.2",
        "--teacher-frac", "1.0", "--public-error-rate", "1.0", "--public-style", "teacher"]
    pairs = jobs["pairs-content"]   # one pairs file for every seed, from the content pool
    assert pairs.argv[1:] == [str(ROOT / "bench" / "disc_probe.py"), "--data", str(d / "sft.json"),
                              "--write-pairs", str(d / "pairs.jsonl"), "--out", str(d / "pairs.report.json")]
    assert pairs.deps == ["data-content"] and pairs.done == d / "pairs.report.json" and not pairs.gpu
    assert pairs.arms == {"aligned_content", "prism_grpo_content"} and jobs["pairs-matched-s0"].arms == {"prism_grpo"}
    for s in (0, 1):
        root = tmp_path / f"s{s}" / "matched"
        warm, align = jobs[f"warmup-content-matched-s{s}"], jobs[f"align-content-matched-s{s}"]
        assert warm.deps == [f"disc-init-moe-matched-s{s}", "pairs-content"]   # the study's MoE init
        assert _arg(warm.argv, "disc.path") == str(root / "disc" / "moe" / "init")
        assert _arg(warm.argv, "data.train") == str(d / "pairs.jsonl") and "optim.lr=1e-4" in warm.argv
        assert _arg(warm.argv, "output_dir") == str(root / "disc" / "content" / "warmup")
        assert align.deps == [warm.name] and _arg(align.argv, "disc.path") == str(root / "disc" / "content" / "warmup" / "final")
        rl, base_rl = jobs[f"rl-prism_grpo_content-s{s}"], jobs[f"rl-prism_grpo-s{s}"]
        assert rl.deps == [align.name] and rl.source == ("align", root / "align" / "content")
        # everything else as the prism_grpo arm: 20 alignment + 30 GRPO steps at 8 x 8, 160 new tokens
        assert _but(align.argv, "disc.path", "output_dir") == _but(jobs[f"align-moe-matched-s{s}"].argv, "disc.path",
                                                                   "output_dir")
        assert _but(rl.argv, "output_dir") == _but(base_rl.argv, "output_dir")
        assert [_arg(align.argv, k) for k in ("train.steps", "rollout.prompts_per_step", "rollout.n",
                                              "rollout.max_new_tokens")] == ["20", "8", "8", "160"]
        assert _arg(rl.argv, "train.steps") == "30" and _arg(align.argv, "model.path") == str(root / "sft" / "final")
        for arm, dep in (("aligned_content", align.name), ("prism_grpo_content", rl.name)):
            ev = jobs[f"eval-{arm}-s{s}"]
            assert ev.deps == [dep] and ev.argv[ev.argv.index("--name") + 1] == f"{arm}_s{s}"
            assert ev.argv[ev.argv.index("--data") + 1] == str(tmp_path / "data" / "matched" / "test.parquet")
            assert "data.limit=448" in ev.argv
    assert planned_steps(PRESETS["cpu"], ARMS["aligned_content"]) == {"align": 20, "rl": 0}
    assert planned_steps(PRESETS["cpu"], ARMS["prism_grpo_content"]) == {"align": 20, "rl": 30}
    assert chain_lengths(jobs)["data-content"] == 5   # content pool, pairs, warm-up, alignment, RL, eval
    assert [c[:2] for c in comparisons(arms + ["sft", "grpo"])] == [
        ("prism_grpo", "grpo"), ("aligned_content", "sft"), ("prism_grpo_content", "grpo"),
        ("prism_grpo_content", "prism_grpo")]
    # the content discriminator under DAPO and GSPO: the same alignment run, then that algorithm,
    # paired against that algorithm's baseline
    more = Planner(tmp_path, PRESETS["cpu"], ["prism_dapo_content", "prism_gspo_content"], [0], {}).plan()
    for algo in ("dapo", "gspo"):
        rl = more[f"rl-prism_{algo}_content-s0"]
        assert rl.deps == ["align-content-matched-s0"] and rl.argv[rl.argv.index("--algo") + 1] == algo
        assert _arg(rl.argv, "train.steps") == "30"
    assert [c[:2] for c in comparisons(["dapo", "gspo", "prism_dapo_content", "prism_gspo_content"])] == [
        ("prism_dapo_content", "dapo"), ("prism_gspo_content", "gspo")]


def test_every_discriminator_is_probed_on_the_study_pool_and_nothing_waits_for_it(tmp_path):
    arms = ["prism_grpo", "prism_grpo_nowarmup", "prism_grpo_content", "prism_grpo_varied"]
    jobs = Planner(tmp_path, PRESETS["cpu"], arms, [0, 1], {}).plan()
    probes = {n: j for n, j in jobs.items() if n.startswith("probe-")}
    assert sorted(probes) == sorted(f"probe-{v}-s{s}" for s in (0, 1)
                                    for v in ("moe-matched", "nowarmup-matched", "content-matched", "moe-varied"))
    for s in (0, 1):
        for variant, data, dep, disc in (
                ("moe", "matched", f"warmup-moe-matched-s{s}", "disc/moe/warmup/final"),
                ("nowarmup", "matched", f"disc-init-moe-matched-s{s}", "disc/moe/init"),
                ("content", "matched", f"warmup-content-matched-s{s}", "disc/content/warmup/final"),
                ("moe", "varied", f"warmup-moe-varied-s{s}", "disc/moe/warmup/final")):
            job, root = probes[f"probe-{variant}-{data}-s{s}"], tmp_path / f"s{s}" / data
            assert job.deps == [dep] and not job.gpu and job.done == root / "disc" / variant / "probe.json"
            assert job.argv[1:] == [str(ROOT / "bench" / "disc_probe.py"), "--disc", str(root / disc), "--data",
                                    str(tmp_path / "data" / data / "sft.json"), "--name", f"{data}/{variant}",
                                    "--limit", "150", "--threads", "1", "--out", str(job.done)]
    assert not any(d in probes for j in jobs.values() for d in j.deps)   # analysis only
    assert chain_lengths(jobs)["warmup-moe-matched-s0"] == 3   # alignment, RL, eval: the probe adds no link
    on_gpu = Planner(tmp_path, PRESETS["gpu"], ["prism_grpo"], [0], {}, gpus=1).plan()["probe-moe-matched-s0"]
    assert on_gpu.gpu and on_gpu.argv[on_gpu.argv.index("--threads") + 1] == "2"   # a GPU slot, the preset's threads
    assert probe_parser().parse_args(on_gpu.argv[2:]).device is None   # disc_probe picks cuda where there is one


def test_dense_content_discriminator_and_the_probes_only_plan(tmp_path):
    """``content_dense``: the dense init warmed up on the content pool's pairs, probed like the
    MoE one; ``up_to_probes`` keeps the jobs the discriminators need, every dependency included,
    and no alignment, RL or evaluation."""
    arms = ["aligned", "aligned_content", "aligned_content_dense", "prism_grpo_content_dense"]
    jobs = Planner(tmp_path, PRESETS["cpu"], arms, [0, 1], {}).plan()
    root = tmp_path / "s1" / "matched"
    warm = jobs["warmup-content_dense-matched-s1"]
    assert warm.deps == ["disc-init-dense-matched-s1", "pairs-content"]
    assert _arg(warm.argv, "disc.path") == str(root / "disc" / "dense" / "init")
    assert _arg(warm.argv, "data.train") == str(tmp_path / "data" / "content" / "pairs.jsonl")
    assert "--dense" in jobs["disc-init-dense-matched-s1"].argv
    assert _but(warm.argv, "disc.path", "output_dir") == _but(jobs["warmup-content-matched-s1"].argv, "disc.path",
                                                              "output_dir")
    assert jobs["probe-content_dense-matched-s1"].deps == [warm.name]
    assert _arg(jobs["align-content_dense-matched-s1"].argv, "disc.path") == str(root / "disc" / "content_dense" /
                                                                              "warmup" / "final")
    kept = up_to_probes(jobs)
    assert {n.split("-")[0] for n in kept} == {"data", "tiny", "sft", "disc", "pairs", "warmup", "probe"}
    assert all(d in kept for j in kept.values() for d in j.deps)
    assert sorted(n for n in kept if n.startswith("probe-")) == sorted(
        f"probe-{v}-matched-s{s}" for v in ("moe", "content", "content_dense") for s in (0, 1))
    assert not any(n.startswith(("align-", "rl-", "eval-")) for n in kept) and any(n.startswith("align-") for n in jobs)
    assert [c[:2] for c in comparisons(arms)] == [("aligned_content", "aligned_content_dense")]


def test_probes_are_averaged_over_seeds_per_discriminator_and_slip(tmp_path):
    """The report's probe table: the mean over seeds of each group's metrics; a seed whose group
    had no pair is listed with 0 pairs and left out of the mean."""
    def metrics(pairs, cap_gap):
        return {"pairs": pairs, "cap_acc": 0.5 + cap_gap, "cap_gap": cap_gap, "reason_acc": 0.5, "reason_gap": 0.0,
                "skipped": 0} if pairs else {"pairs": 0, "skipped": 0}
    for s, (none, perc) in {0: ((10, 0.0), (6, 0.1)), 1: ((12, 0.2), (0, None))}.items():
        f = tmp_path / f"s{s}" / "matched" / "disc" / "moe" / "probe.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"matched/moe": {"none": metrics(*none), "perception": metrics(*perc),
                                                 "records_skipped": {}}}))
    got = discriminator_probes(tmp_path, [0, 1, 2])
    assert list(got) == ["matched/moe"] and set(got["matched/moe"]) == {"none", "perception", "reasoning"}
    none, perc, reason = (got["matched/moe"][k] for k in ("none", "perception", "reasoning"))
    assert none["seeds"] == 2 and none["pairs"] == [10, 12]
    assert none["cap_gap"] == pytest.approx(0.1) and none["cap_acc"] == pytest.approx(0.6)
    assert perc["pairs"] == [6, 0] and perc["cap_gap"] == pytest.approx(0.1) and perc["reason_acc"] == 0.5
    assert reason == {"seeds": 0, "pairs": [], "cap_acc": None, "cap_gap": None, "reason_acc": None, "reason_gap": None}
    md = render({"arms": {}, "comparisons": [], "alignment": {}, "probes": got, "warmup_pairs": {}, "not_run": {}},
                {"preset": "cpu", "seeds": [0, 1], "gpus": 0, "budget_min": 1, "wall_min": 0.0})
    assert "| matched/moe | none | 2 | 10, 12 | 0.60 | +0.10 | 0.50 | +0.00 |" in md
    assert "| matched/moe | perception | 2 | 6, 0 | 0.60 | +0.10 | 0.50 | +0.00 |" in md


def test_content_warmup_is_the_measured_two_epochs_and_scales_with_the_preset(tmp_path):
    from prism_rl.cli import build_parser
    from prism_rl.config import WarmupConfig, load_config

    for name, p in PRESETS.items():
        jobs = Planner(tmp_path / name, p, ["prism_grpo_content"], [0], {}).plan()
        argv = jobs["data-content"].argv
        assert argv[argv.index("--n") + 1] == str(p.problems) and argv[argv.index("--test-frac") + 1] == str(p.test_frac)
        warm = jobs["warmup-content-matched-s0"].argv
        assert _but(warm, "disc.path", "data.train", "output_dir") == _but(
            Planner(tmp_path / name, p, ["prism_grpo"], [0], {}).plan()["warmup-moe-matched-s0"].argv,
            "disc.path", "data.train", "output_dir")   # the preset's warm-up settings, as for the study's pairs
        a = build_parser().parse_args(warm[warm.index("prism_rl.cli") + 1:])
        cfg = load_config(WarmupConfig, ROOT / a.config, a.overrides)
        assert cfg.train.epochs == 2   # the script's explicit train.epochs=2 is the config's (and presets') value


def _but(argv: list[str], *keys: str) -> list[str]:
    """``argv`` without the ``key=value`` overrides of ``keys`` (what two jobs may differ in)."""
    return [a for a in argv if a.split("=", 1)[0] not in keys]


def test_resolve_policy_prefers_final_then_newest_checkpoint(tmp_path):
    run = tmp_path / "align"
    assert resolve_policy("align", run) == (None, None)
    for step in (2, 10):
        (run / f"checkpoint-{step}" / "policy").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "policy" / "config.json").write_text("{}")
    assert resolve_policy("align", run) == (run / "checkpoint-10" / "policy", 10)
    (run / "final" / "policy").mkdir(parents=True)
    (run / "final" / "policy" / "config.json").write_text("{}")
    assert resolve_policy("align", run) == (run / "final" / "policy", None)


@pytest.mark.slow
def test_cpu_smoke_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "bench/stage2_study.py", "--preset", "cpu-smoke", "--seeds", "0",
                           "--arms", "grpo,prism_grpo", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"grpo", "prism_grpo"} and not res["not_run"]
    for arm in ("grpo", "prism_grpo"):
        seed0 = res["arms"][arm]["seeds"]["0"]
        assert 0.0 <= seed0["acc"] <= 1.0 and 0.0 <= seed0["perception"] <= 1.0 and seed0["tokens"] > 0
        assert res["arms"][arm]["gpu_min_own"] > 0
    assert res["arms"]["grpo"]["seeds"]["0"]["rl_done"] == 2
    assert (res["arms"]["prism_grpo"]["seeds"]["0"]["align_done"], res["arms"]["prism_grpo"]["seeds"]["0"]["rl_done"]) == (1, 1)
    (cmp,) = res["comparisons"]
    assert (cmp["a"], cmp["b"]) == ("prism_grpo", "grpo") and cmp["acc"]["n_problems"] == 6
    assert cmp["acc"]["lo"] <= cmp["acc"]["mean"] <= cmp["acc"]["hi"]
    assert "rollout/perception" in res["alignment"]["matched/moe"]
    probe = res["probes"]["matched/moe"]   # the warmed-up discriminator, probed on the smoke pool
    assert {k: probe[k]["seeds"] for k in probe} == {"none": 1, "perception": 1, "reasoning": 1}
    assert all(0 <= n <= 8 for k in probe for n in probe[k]["pairs"]) and sum(probe["none"]["pairs"]) > 0
    md = (out / "results.md").read_text()
    assert md.startswith("# Stage-2 study (issue 16)") and "| prism_grpo | grpo |" in md
    assert (out / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # the alignment run's curves


def test_gpu_preset_commands_parse_and_their_configs_load(tmp_path):
    """Every command the gpu preset runs is accepted by the CLI parser, and every training and
    evaluation config loads with its overrides (a typo would only surface on the GPU machine)."""
    from prism_rl.cli import build_parser
    from prism_rl.config import ALGO_PRESETS, AlignConfig, EvalConfig, RLConfig, SFTConfig, WarmupConfig, load_config

    arms = list(ARMS)
    jobs = Planner(tmp_path, PRESETS["gpu"], arms, [0], {}).plan()
    classes = {"sft": SFTConfig, "warmup": WarmupConfig, "align": AlignConfig, "rl": RLConfig, "eval": EvalConfig}
    loaded = set()
    for job in jobs.values():
        if job.argv[1].endswith("disc_probe.py"):   # the content pairs and the probes: a bench script, not the CLI
            a = probe_parser().parse_args(job.argv[2:])
            assert a.write_pairs if job.name == "pairs-content" else (len(a.disc) == len(a.data) == 1 and a.out)
            continue
        argv = job.argv if job.argv[0] != "sh" else job.argv[2].split(" && ")[0].split()
        cli = [x.replace("{policy}", str(tmp_path / "policy")) for x in argv[argv.index("prism_rl.cli") + 1:]]
        a = build_parser().parse_args(cli)
        stage = "warmup" if cli[2:4] == ["disc", "warmup"] else cli[2]
        if stage in classes:
            defaults = ALGO_PRESETS[a.algo] if stage == "rl" else None
            load_config(classes[stage], ROOT / a.config, a.overrides, defaults=defaults)
            loaded.add(stage)
    assert loaded == set(classes)


def test_a_job_is_redone_when_its_start_policy_changed(tmp_path):
    job = Job("eval-x", ["true"], tmp_path / "run" / "summary.json", source=("rl", tmp_path / "rl"),
              out_dir=tmp_path / "run")
    assert not _same_start(job, "/rl/checkpoint-4")            # no record: not known to be the same
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / START_FILE).write_text("/rl/checkpoint-4")
    assert _same_start(job, "/rl/checkpoint-4") and not _same_start(job, "/rl/final")
    assert _same_start(Job("sft", ["true"], tmp_path / "x"), None)   # a job without a source


def test_a_failed_job_gives_its_error_line_and_its_dependents_name_it(tmp_path):
    """A job that fails shows the ``prism ...: error:`` line of its log in its reason, and the
    jobs after it say which job stopped them and why (the report's "Not run" list)."""
    msg = "prism rl: error: run: the rollouts of steps 1..3 had NaN/inf logits"
    jobs = {"rl": Job("rl", ["sh", "-c", f"echo noise; echo '{msg}' >&2; exit 1"], tmp_path / "rl.done", gpu=False),
            "eval": Job("eval", ["true"], tmp_path / "eval.done", ["rl"], gpu=False),
            "report": Job("report", ["true"], tmp_path / "report.done", ["eval"], gpu=False)}
    state = Runner(jobs, tmp_path / "out", gpus=0, per_gpu=2, budget_s=60, reserve_s=5).run()
    assert state["rl"]["status"] == "failed" and state["rl"]["why"] == f"exit 1, see logs/rl.log: {msg}"
    assert state["eval"] == {"status": "not run", "why": f"rl failed: exit 1, see logs/rl.log: {msg}"}
    assert state["report"]["why"].startswith("eval not run: rl failed: exit 1")


def test_a_job_that_ran_out_of_gpu_memory_is_retried_with_fewer_jobs_per_gpu(tmp_path):
    """A job whose log shows a CUDA OOM goes back in the queue and its GPU takes half as many
    jobs at once; the attempt's log is kept. One that runs out every time fails after
    OOM_RETRIES retries and says so; any other failure, or a job off the GPU, is not retried."""
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 76.00 MiB."
    flag = tmp_path / "tried"
    once = f"if [ -f {flag} ]; then touch {tmp_path}/once.done; else touch {flag}; echo '{oom}' >&2; exit 1; fi"
    jobs = {"once": Job("once", ["sh", "-c", once], tmp_path / "once.done"),
            "always": Job("always", ["sh", "-c", f"echo '{oom}' >&2; exit 1"], tmp_path / "always.done"),
            "other": Job("other", ["sh", "-c", "echo 'ValueError: bad' >&2; exit 1"], tmp_path / "other.done"),
            "cpu": Job("cpu", ["sh", "-c", f"echo '{oom}' >&2; exit 1"], tmp_path / "cpu.done", gpu=False),
            "after": Job("after", ["touch", str(tmp_path / "after.done")], tmp_path / "after.done", ["once"])}
    runner = Runner(jobs, tmp_path / "out", gpus=1, per_gpu=8, budget_s=60, reserve_s=5)
    state = runner.run()
    assert state["once"]["status"] == "done" and state["once"]["oom_retries"] == 1
    assert state["after"]["status"] == "done"
    assert state["always"]["status"] == "failed" and state["always"]["oom_retries"] == 2
    assert state["always"]["why"].endswith("(retried 2 times after running out of GPU memory)")
    assert state["other"]["status"] == "failed" and "oom_retries" not in state["other"]
    assert state["cpu"]["status"] == "failed" and "oom_retries" not in state["cpu"]   # not a GPU job
    assert runner.cap[0] == 1   # three OOMs: 8 -> 4 -> 2 -> 1
    logs = sorted(x.name for x in (tmp_path / "out" / "logs").iterdir())
    assert logs == ["after.log", "always.log", "always.oom1.log", "always.oom2.log", "cpu.log", "once.log",
                    "once.oom1.log", "other.log"]
    assert oom in (tmp_path / "out" / "logs" / "once.oom1.log").read_text()


def test_nan_probe_counts_the_batches_a_policy_goes_nan_on(tiny_model_dir, tmp_path, capsys):
    from nan_probe import main as nan_probe

    from prism_rl.data.layouts import write_records
    from prism_rl.data.records import ImageRef, Record

    data = tmp_path / "test.parquet"
    write_records([Record(id=f"q{i}", messages=[{"role": "user", "content": "<image>How many circles?"}],
                          images=[ImageRef(data=png_bytes("red"))], ground_truth="1") for i in range(3)], data)
    bad = overflowing_copy(tiny_model_dir, tmp_path / "overflow")
    assert nan_probe([str(tiny_model_dir), str(bad), "--data", str(data), "--batch", "2", "--max-new-tokens", "3",
                      "--dtype", "fp32"]) == 0
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {tmp_path}")
            or r.startswith(f"| {tiny_model_dir}")]
    assert [r[1:4] for r in rows] == [["2", "0", "0"], ["2", "2", "0"]]   # batches, NaN batches, empty responses


def test_paired_compare_of_two_arms_hand_checked(tmp_path):
    from paired_compare import compare, render

    def write(name, accs):
        d = tmp_path / name / "heldout-test"
        d.mkdir(parents=True)
        d.joinpath("samples.jsonl").write_text("".join(
            json.dumps({"id": f"p{i}", "acc": a, "perception": 0.5, "tokens": 10, "format": 1.0}) + "\n"
            for i, a in enumerate(accs)))
        return str(tmp_path / name)

    # seed 0: A right on p0, p1; B on p0. seed 1: A on p0; B on p0, p2.
    res = compare([write("a0", [1, 1, 0]), write("a1", [1, 0, 0])], [write("b0", [1, 0, 0]), write("b1", [1, 0, 1])])
    assert res["a"][0]["acc"] == pytest.approx(2 / 3) and res["b"][1]["acc"] == pytest.approx(2 / 3)
    # per problem, averaged over the seeds: p0 0, p1 (1 + 0) / 2, p2 (0 - 1) / 2 -> mean 0
    assert res["acc"]["mean"] == pytest.approx(0.0) and res["acc"]["problems"] == 3
    assert res["perception"]["mean"] == 0.0 and res["perception"]["lo"] == res["perception"]["hi"] == 0.0
    assert "A - B acc: +0.0" in render(res, "A", "B")


def test_paired_compare_can_leave_out_empty_responses_at_the_limit(tmp_path):
    """An empty response that ran to the token limit (NaN logits' sign) in any seed of either
    arm takes its problem out of both arms with --drop-empty, and is counted; an empty response
    that stopped (EOS) stays."""
    from paired_compare import compare, render

    def write(name, rows):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("samples.jsonl").write_text("".join(json.dumps(
            {"id": f"p{i}", "acc": a, "perception": None, "tokens": 8, "format": 0.0, "response": text,
             "finish": finish}) + "\n" for i, (a, text, finish) in enumerate(rows)))
        return str(d)

    ok = ("x", "stop")
    a = [write("a0", [(1, *ok), (0, "", "length"), (1, *ok), (0, "", "stop")])]
    b = [write("b0", [(0, *ok), (0, *ok), (1, *ok), (0, *ok)])]
    kept = compare(a, b, skip_empty=True)
    assert kept["dropped"] == 1 and kept["acc"]["problems"] == 3
    assert kept["a"][0]["acc"] == pytest.approx(2 / 3)         # p0, p2 right of p0, p2, p3
    assert kept["acc"]["mean"] == pytest.approx(100 / 3)        # p0 +1, p2 0, p3 0
    assert render(kept, "A", "B").startswith("left out: 1 problems")
    full = compare(a, b)
    assert full["dropped"] == 0 and full["acc"]["problems"] == 4 and full["a"][0]["acc"] == 0.5


def test_empty_audit_marks_whole_and_partial_nan_batches(tmp_path):
    from empty_audit import audit

    rows = [("", "length")] * 3 + [("", "length"), ("x", "length"), ("", "stop")] + [("y", "stop")] * 2
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"response": t, "finish": fin}) + "\n" for t, fin in rows))
    assert audit(f, 3) == (4, 8, "Ep.")


def _align_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    start = [{"step": 0, "event": "start", "disc/cap_gap": 99.0}]   # an event row: never plotted
    path.write_text("".join(json.dumps(r) + "\n" for r in start + [{**r, "timing/step_s": 1.0} for r in rows]))


def test_alignment_dynamics_per_step_over_seeds_hand_checked(tmp_path):
    out = tmp_path / "study"
    # seed 0: steps 1-3; seed 1: steps 1-2 (stopped by a budget) - step 3 is seed 0's alone
    _align_metrics(out / "s0/matched/align/moe/metrics.jsonl",
                   [{"step": 1, "disc/cap_gap": 0.5, "disc/expert_load": [0.25, 0.75]},
                    {"step": 2, "disc/cap_gap": 0.1, "disc/expert_load": [0.5, 0.5]},
                    {"step": 3, "disc/cap_gap": -0.2}])
    _align_metrics(out / "s1/matched/align/moe/metrics.jsonl",
                   [{"step": 1, "disc/cap_gap": 0.1, "disc/expert_load": [0.4, 0.6]},
                    {"step": 2, "disc/cap_gap": 0.3, "disc/expert_load": [0.9, 0.1]}])
    _align_metrics(out / "s0/matched/align/dense/metrics.jsonl",
                   [{"step": 1, "disc/cap_gap": 1.0, "disc/expert_load": []}])
    runs = alignment_runs(out, [0, 1, 2])
    assert sorted(runs) == ["matched/dense", "matched/moe"] and sorted(runs["matched/moe"]) == [0, 1]
    gap = step_series(runs["matched/moe"], "disc/cap_gap")
    assert gap["step"] == [1, 2, 3] and gap["n"] == [2, 2, 1]
    assert gap["mean"] == pytest.approx([0.3, 0.2, -0.2]) and gap["lo"] == [0.1, 0.1, -0.2] and gap["hi"] == [0.5, 0.3, -0.2]
    load = step_series(runs["matched/moe"], "disc/expert_load_max")   # max over experts, then over seeds
    assert load["mean"] == pytest.approx([(0.75 + 0.6) / 2, (0.5 + 0.9) / 2]) and load["hi"] == [0.75, 0.9]
    res = dynamics([out], [0, 1])
    assert res["matched/dense"]["disc/expert_load_max"]["step"] == []   # a dense discriminator has no experts
    png = plot(res, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no alignment metrics"):
        plot(dynamics([tmp_path / "empty"], [0]), tmp_path / "none.png")


def _eval_rows(folder, rows):
    """A ``prism eval`` samples.jsonl of (task, acc, finish) rows, ids p0, p1, ..."""
    folder.mkdir(parents=True)
    folder.joinpath("samples.jsonl").write_text("".join(json.dumps(
        {"id": f"p{i}", "task": t, "acc": a, "perception": 0.5, "tokens": 9, "format": float(f == "stop"),
         "response": "x", "finish": f}) + "\n" for i, (t, a, f) in enumerate(rows)))


def test_report_only_rewrites_the_report_with_cut_off_shares_and_task_families(tmp_path):
    """``--report-only`` runs nothing and reads jobs.json; the report shows the share of answers
    cut off at the token limit and the accuracy per task family (hand-computed below)."""
    from stage2_plan import eval_dir
    from stage2_study import main

    out = tmp_path / "study"
    # seed 0: arith right/cut/cut, chart right; seed 1: arith right/right/cut, chart wrong
    _eval_rows(eval_dir(out, "sft", 0), [("arith", 1, "stop"), ("arith", 0, "length"), ("arith", 0, "length"),
                                         ("chart", 1, "stop")])
    _eval_rows(eval_dir(out, "sft", 1), [("arith", 1, "stop"), ("arith", 1, "stop"), ("arith", 0, "length"),
                                         ("chart", 0, "stop")])
    args = ["--preset", "cpu-smoke", "--seeds", "0,1", "--arms", "sft", "--out", str(out)]
    with pytest.raises(SystemExit):   # no jobs.json yet: nothing to report, and nothing is run
        main([*args, "--report-only"])
    (out / "jobs.json").write_text(json.dumps({f"eval-sft-s{s}": {"status": "done", "start": 0.0, "wall_s": 60.0,
                                                                  "gpu_share_s": 0.0, "oom_retries": s} for s in (0, 1)}))
    assert main([*args, "--report-only"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["oom_retried"] == {"eval-sft-s1": 1}
    assert "Started again after running out of GPU memory (times): eval-sft-s1 (1)" in (out / "results.md").read_text()
    sft = res["arms"]["sft"]
    assert sft["summary"]["cut"][0] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert sft["by_task"]["arith"]["acc"][0] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert sft["by_task"]["arith"]["cut"][0] == pytest.approx(0.5)
    assert sft["by_task"]["chart"]["acc"] == pytest.approx([0.5, 0.7071], abs=1e-4)
    md = (out / "results.md").read_text()
    assert "| sft | 2 | 50.0 ± 0.0 | 50.0 ± 0.0 | 9 ± 0 | 62.5 ± 17.7 | 37.5 ± 17.7 |" in md
    assert "| sft | 50.0 ± 23.6 (50) | 50.0 ± 70.7 |" in md   # chart had no cut-off answer: no bracket
    assert not (out / "s0").exists()                            # nothing was trained


def test_a_study_without_math_verify_stops_before_it_starts(tmp_path):
    """Every RL, alignment and evaluation job scores with math-verify's fallback: a study on a
    machine that cannot import it exits at once with the reason (the 2026-12-01 GPU runs scored
    those answers 0 instead), and runs nothing."""
    env = shadowed_math_verify_env(tmp_path, "raise ImportError('No module named math_verify')")
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "bench/stage2_study.py", "--preset", "cpu-smoke", "--seeds", "0",
                           "--arms", "sft", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "math-verify cannot be imported" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_rescore_counts_stored_scores_the_reward_now_disagrees_with(tmp_path):
    """bench/rescore.py: a row stored as wrong that the reward accepts (what a missing
    math-verify did) is counted as gained, a right one it rejects as lost, agreeing rows not."""
    from rescore import rescore

    def resp(answer):
        return f"<caption>\n- a grid\n</caption>\n<think>\nso\n</think>\n<answer>\n{answer}\n</answer>"

    rows = [(resp("\\sqrt{16}"), "4", 0.0, "\\sqrt{16}"), (resp("5"), "4", 1.0, "5"), (resp("4"), "4", 1.0, "4")]
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"response": r, "ground_truth": g, "acc": a, "answer": ans}) + "\n"
                         for r, g, a, ans in rows))
    assert rescore(f) == {"rows": 3, "gained": 1, "lost": 1, "examples": [("\\sqrt{16}", "4"), ("5", "4")]}


def test_demo_lengths_per_family_and_the_share_over_each_limit(tiny_model_dir, tmp_path):
    from demo_lengths import lengths, table
    from transformers import AutoTokenizer

    from prism_rl.data.layouts import read_records

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "<answer>\n12\n</answer>"
    pool = tmp_path / "sft.json"
    pool.write_text(json.dumps([
        {"id": f"r{i}", "task": "arith", "style": "teacher",
         "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]} for i in range(2)]))
    n = len(tok(text)["input_ids"]) + 1
    assert lengths(read_records(pool), tok) == {("arith", "teacher"): [n, n]}
    md = table({("arith", "public"): [100, 130, 170, 90]}, [128, 160])
    assert md.splitlines()[2] == "| arith | public | 4 | 122 | 170 | 50.0 | 25.0 |"


def test_a_rerun_keeps_the_earlier_runs_records_in_jobs_json():
    """A second study in the same folder: a stage it reused keeps the first run's record (its
    cost), a job only the first run planned stays, and the second run's clock starts where the
    first ended (hand-computed: the first ended at 30 + 70 = 100 s)."""
    from stage2_study import with_earlier_runs

    first = {"sft-s0": {"status": "done", "start": 0.0, "wall_s": 30.0, "gpu_share_s": 12.0},
             "rl-dapo-s0": {"status": "done", "start": 30.0, "wall_s": 70.0, "gpu_share_s": 20.0}}
    second = {"sft-s0": {"status": "done", "start": 1.0, "wall_s": 0.0, "gpu_share_s": 0.0, "skipped": True},
              "rl-grpo-s0": {"status": "done", "start": 2.0, "wall_s": 50.0, "gpu_share_s": 9.0},
              "eval-grpo-s0": {"status": "not run", "why": "rl-grpo-s0 failed"}}
    merged = with_earlier_runs(first, second)
    assert merged["sft-s0"] == first["sft-s0"] and merged["rl-dapo-s0"] == first["rl-dapo-s0"]
    assert merged["rl-grpo-s0"] == {"status": "done", "start": 102.0, "wall_s": 50.0, "gpu_share_s": 9.0}
    assert merged["eval-grpo-s0"] == second["eval-grpo-s0"]
    assert with_earlier_runs({}, second)["rl-grpo-s0"]["start"] == 2.0   # a first run: nothing shifts
