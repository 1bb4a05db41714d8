"""The stage-2 study's report: per-arm accuracy, perception score and response length (mean
± std over seeds), paired per-problem bootstrap confidence intervals of PRISM minus its
baseline, the alignment runs' dynamics, a plain verdict per claim, and GPU-minutes per arm.
Writes ``results.json`` and ``results.md`` into the study folder."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from stage2_dynamics import alignment_runs
from stage2_plan import ABLATIONS, ALGOS, ARMS, eval_dir, planned_steps

METRICS = ("acc", "perception", "tokens", "format", "cut")


# --------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap_ci(diffs: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
                        ) -> tuple[float, float, float]:
    """Mean of per-problem differences ``d_i`` and its bootstrap confidence interval.

    ``d_i`` = (arm A minus arm B on problem i, averaged over the seeds both have), so the
    problem-to-problem difficulty cancels. Resample the problems with replacement ``n_boot``
    times, take each resample's mean ``m_b``; the interval is the ``(1-level)/2`` and
    ``(1+level)/2`` empirical quantiles of the sorted ``m_b`` (index ``floor(q (n_boot - 1))``).
    Deterministic for a ``seed``.
    """
    if not diffs:
        raise ValueError("paired_bootstrap_ci: no paired problems")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * (n_boot - 1))]
    hi = means[int((1 + level) / 2 * (n_boot - 1))]
    return sum(diffs) / n, lo, hi


def paired_diffs(a: dict[int, dict[str, dict]], b: dict[int, dict[str, dict]], metric: str) -> tuple[list[float], list]:
    """Per-problem differences of ``metric`` between two arms' rows (seed -> id -> row),
    averaged over the seeds both arms have; only problems every such seed scored in both."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return [], []
    ids = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    ids = sorted(i for i in ids if all(a[s][i].get(metric) is not None and b[s][i].get(metric) is not None
                                       for s in seeds))
    return [sum(a[s][i][metric] - b[s][i][metric] for s in seeds) / len(seeds) for i in ids], seeds


# --------------------------------------------------------------------------- reading the runs


def read_rows(path: Path) -> dict[str, dict]:
    """``prism eval``'s samples.jsonl as id -> {acc, perception, tokens, format, cut, task,
    empty_at_limit}. ``cut``: 1 when the response ran to the token limit (``finish`` is
    ``length``), None when the file does not say. ``empty_at_limit``: the response decodes to
    nothing and ran to the token limit, the sign of a wave the graph engine lost before its fix
    (every row ended before the limit and none was written out; ``bench/empty_audit.py``)."""
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        finish = r.get("finish")
        rows[str(r["id"])] = {"acc": float(r["acc"]), "perception": r.get("perception"), "tokens": float(r["tokens"]),
                              "format": float(r["format"]), "cut": None if finish is None else float(finish == "length"),
                              "task": r.get("task"), "empty_at_limit": empty_at_limit(r)}
    return rows


def empty_at_limit(sample: dict) -> bool:
    """A ``prism eval`` sample that decodes to nothing and ran to the token limit."""
    return sample.get("response") == "" and sample.get("finish") == "length"


def _per_seed(rows: dict[str, dict]) -> dict[str, float | None]:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows.values() if r[m] is not None]
        out[m] = sum(vals) / len(vals) if vals else None
    return out


def by_task(rows_by_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per task family: (mean, std) over seeds of each seed's accuracy and cut-off share on that
    family's problems. Where an arm's gain comes from: a family whose answers ran past the token
    limit gains from RL learning to be short, not only from reasoning better."""
    tasks = sorted({r["task"] for rows in rows_by_seed.values() for r in rows.values() if r["task"] is not None})
    out = {}
    for t in tasks:
        per_seed = [_per_seed({k: r for k, r in rows.items() if r["task"] == t}) for rows in rows_by_seed.values()]
        out[t] = {m: mean_std([p[m] for p in per_seed if p[m] is not None]) for m in ("acc", "cut")
                  if any(p[m] is not None for p in per_seed)}
    return out


def last_step(metrics: Path) -> int:
    """The last training step a run logged (0 when it logged none)."""
    if not metrics.exists():
        return 0
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"timing/step_s"' in x]
    return max((int(r["step"]) for r in rows), default=0)


def steps_done(out: Path, arm, seed: int) -> dict[str, int]:
    """Alignment and RL steps the evaluated policy of ``arm`` went through, from the runs' logs
    (a run the budget stopped is evaluated at its last step)."""
    root = out / f"s{seed}" / arm.data
    return {"align_done": last_step(root / "align" / arm.disc / "metrics.jsonl") if arm.disc else 0,
            "rl_done": last_step(root / "rl" / arm.name / "metrics.jsonl") if arm.algo else 0}


def alignment_dynamics(out: Path, seeds: list[int]) -> dict[str, dict]:
    """Per alignment run (data, discriminator variant): mean over seeds of the first and last
    third of its steps for the caption/reasoning gaps, the rollouts' perception, accuracy and format."""
    keys = ("disc/cap_gap", "disc/reason_gap", "rollout/perception", "rollout/acc", "rollout/format")
    found: dict[str, list[dict]] = {}
    for name, by_seed in alignment_runs(out, seeds).items():
        for rows in by_seed.values():
            k = max(1, len(rows) // 3)
            found.setdefault(name, []).append({
                key: (statistics.mean(r[key] for r in rows[:k] if key in r) if any(key in r for r in rows[:k]) else None,
                      statistics.mean(r[key] for r in rows[-k:] if key in r) if any(key in r for r in rows[-k:]) else None)
                for key in keys} | {"steps": len(rows)})
    return {name: {key: [_avg([r[key][i] for r in runs]) for i in (0, 1)] if key != "steps" else [r["steps"] for r in runs]
                   for key in (*keys, "steps")} for name, runs in found.items()}


PROBE_KEYS = ("cap_acc", "cap_gap", "reason_acc", "reason_gap")
SLIPS = ("none", "perception", "reasoning")


def discriminator_probes(out: Path, seeds: list[int]) -> dict[str, dict]:
    """Per warmed-up discriminator (data/variant) and public slip kind: the seeds probed, the
    pairs per seed, and the mean over those seeds of ``disc_probe.py``'s caption and reasoning
    accuracy and gap (a seed whose group had no pair is left out of that group's mean)."""
    found: dict[str, list[dict]] = {}
    for s in seeds:
        for f in sorted((out / f"s{s}").glob("*/disc/*/probe.json")):
            for name, res in json.loads(f.read_text()).items():
                found.setdefault(name, []).append(res)
    table: dict[str, dict] = {}
    for name, runs in found.items():
        table[name] = {}
        for kind in SLIPS:
            got = [r[kind] for r in runs if kind in r]
            scored = [g for g in got if g["pairs"]]
            table[name][kind] = {"seeds": len(got), "pairs": [g["pairs"] for g in got]} | {
                k: _avg([g[k] for g in scored]) for k in PROBE_KEYS}
    return table


def _avg(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- comparisons and verdicts


def comparisons(arms: list[str]) -> list[tuple[str, str, str]]:
    """(arm A, arm B, the claim A > B tests) for every pair the selected arms allow. Each claim
    is the paper's direction (the MoE discriminator beats each ablation of it, so A is the MoE
    arm there), so a verdict's "supported" / "contradicted" reads against the paper."""
    out = [("aligned", "sft", "stage 2 repairs the SFT policy's perception (aligned vs SFT)")]
    out += [(f"prism_{a}", a, f"PRISM+{a.upper()} beats SFT+{a.upper()} at matched compute") for a in ALGOS]
    out += [("prism_grpo", f"prism_grpo_{v}", f"ablation {v}: the MoE discriminator beats it") for v in ABLATIONS]
    out += [("prism_grpo_varied", "grpo_varied", "control (style-mismatched public data): PRISM+GRPO vs SFT+GRPO")]
    out += [("aligned_content", "sft", "content discriminator: stage 2 repairs the SFT policy's perception"),
            *[(f"prism_{a}_content", a, f"content discriminator: PRISM+{a.upper()} beats SFT+{a.upper()} at matched compute")
              for a in ALGOS],
            ("prism_grpo_content", "prism_grpo", "content discriminator: beats the study's warm-up"),
            ("aligned_content", "aligned_content_dense", "content discriminator: MoE beats dense after alignment"),
            ("prism_grpo_content", "prism_grpo_content_dense", "content discriminator: MoE beats dense")]
    return [c for c in out if c[0] in arms and c[1] in arms]


def verdict(lo: float, hi: float, unit: str) -> str:
    if lo > 0:
        return f"supported: A above B ({unit} CI above 0)"
    if hi < 0:
        return f"contradicted: A below B ({unit} CI below 0)"
    return f"not shown: the {unit} CI includes 0"


# --------------------------------------------------------------------------- the report


def collect(out: Path, preset, arms: list[str], seeds: list[int], state: dict, jobs: dict) -> dict:
    """Everything the report shows, as one JSON-able dict."""
    res: dict = {"arms": {}, "not_run": {}, "rows": {}}
    for arm in arms:
        per_seed, rows_by_seed = {}, {}
        for s in seeds:
            ev = eval_dir(out, arm, s) / "samples.jsonl"
            st = state.get(f"eval-{arm}-s{s}", {})
            if st.get("status") != "done" or not ev.exists():
                res["not_run"][f"{arm}_s{s}"] = st.get("why", st.get("status", "not planned"))
                continue
            rows_by_seed[s] = read_rows(ev)
            per_seed[s] = _per_seed(rows_by_seed[s]) | {"evaluated": st.get("policy")} | steps_done(out, ARMS[arm], s)
        res["rows"][arm] = rows_by_seed
        cost = _cost(arm, state, jobs)
        summary = {m: (mean_std([v[m] for v in per_seed.values() if v[m] is not None])
                       if any(v[m] is not None for v in per_seed.values()) else None) for m in METRICS}
        res["arms"][arm] = {"seeds": per_seed, "summary": summary, "planned_steps": planned_steps(preset, ARMS[arm]),
                            "by_task": by_task(rows_by_seed), **cost}
    res["oom_retried"] = {n: st["oom_retries"] for n, st in sorted(state.items()) if st.get("oom_retries")}
    res["comparisons"] = []
    for a, b, claim in comparisons([x for x in arms if res["rows"].get(x)]):
        entry = {"a": a, "b": b, "claim": claim}
        for m in ("acc", "perception", "tokens"):
            diffs, common = paired_diffs(res["rows"][a], res["rows"][b], m)
            if diffs:
                mean, lo, hi = paired_bootstrap_ci(diffs)
                entry[m] = {"mean": mean, "lo": lo, "hi": hi, "n_problems": len(diffs), "seeds": common}
        if "acc" in entry:
            key = "perception" if a.startswith("aligned") and "perception" in entry else "acc"
            entry["verdict"] = verdict(entry[key]["lo"], entry[key]["hi"], key)
        res["comparisons"].append(entry)
    res["alignment"] = alignment_dynamics(out, seeds)
    res["probes"] = discriminator_probes(out, seeds)
    res["warmup_pairs"] = {f"{f.parent.name}/s{s}": json.loads(f.read_text())
                           for s in seeds for f in sorted((out / f"s{s}").glob("*/pairs.topup.json"))}
    del res["rows"]
    return res


def _cost(arm: str, state: dict, jobs: dict) -> dict:
    """GPU-minutes: of the arm's own stages (used by no other arm), and with an equal share of
    every shared stage (data, SFT, warm-up, a shared alignment run) added."""
    own = shared = 0.0
    for name, job in jobs.items():
        if arm not in job.arms or not job.gpu:
            continue
        s = state.get(name, {}).get("gpu_share_s", 0.0) / 60
        own += s if len(job.arms) == 1 else 0.0
        shared += s / len(job.arms)
    return {"gpu_min_own": own, "gpu_min_with_shared": shared}


def _fmt(ms, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "-"
    m, s = ms
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def render(res: dict, header: dict) -> str:
    lines = [f"# Stage-2 study (issue 16): preset {header['preset']}", "",
             f"Seeds {header['seeds']}; {header['gpus']} GPUs; budget {header['budget_min']} min; wall "
             f"{header['wall_min']:.1f} min. Held-out test problems, greedy. ± is the standard deviation over seeds. "
             "GPU-min: each second a process runs counts 1/k when k processes share its GPU"
             + (" (a CPU run: the same over the CPU's processes)." if not header["gpus"] else "."),
             "", "| arm | seeds | accuracy % | perception % | resp tokens | format % | cut off % | "
             "steps planned (align + RL) | GPU-min own | GPU-min incl. shared |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in res["arms"].items():
        sm, ps = r["summary"], r["planned_steps"]
        done = sorted({f"{v['align_done']} + {v['rl_done']}" for v in r["seeds"].values()})
        reached = "" if done in ([], [f"{ps['align']} + {ps['rl']}"]) else f" (done: {', '.join(done)})"
        lines.append(f"| {arm} | {len(r['seeds'])} | {_fmt(sm['acc'])} | {_fmt(sm['perception'])} | "
                     f"{_fmt(sm['tokens'], 1.0, 0)} | {_fmt(sm['format'])} | {_fmt(sm['cut'])} | "
                     f"{ps['align']} + {ps['rl']}{reached} | "
                     f"{r['gpu_min_own']:.1f} | {r['gpu_min_with_shared']:.1f} |")
    lines += task_table(res["arms"])
    lines += ["", "Paired per problem (A minus B, averaged over the seeds both have; bootstrap 95% CI over problems, "
              "points):", "", "| A | B | accuracy | perception | resp tokens | problems | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in res["comparisons"]:
        def ci(m, scale=100.0, c=c):
            e = c.get(m)
            return "-" if e is None else f"{scale * e['mean']:+.1f} [{scale * e['lo']:+.1f}, {scale * e['hi']:+.1f}]"
        n = c.get("acc", {}).get("n_problems", 0)
        lines.append(f"| {c['a']} | {c['b']} | {ci('acc')} | {ci('perception')} | {ci('tokens', 1.0)} | {n} | "
                     f"{c.get('verdict', 'no paired data')} |")
    lines += ["", "Claims:", ""] + [f"- {c['claim']}: **{c.get('verdict', 'no paired data')}**" for c in res["comparisons"]]
    if res["alignment"]:
        lines += ["", "Alignment dynamics (mean over seeds; first third -> last third of the steps):", "",
                  "| run | steps | caption gap | reasoning gap | rollout perception | rollout acc | rollout format |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in res["alignment"].items():
            cells = [f"{_num(d[k][0])} -> {_num(d[k][1])}" for k in
                     ("disc/cap_gap", "disc/reason_gap", "rollout/perception", "rollout/acc", "rollout/format")]
            lines.append(f"| {name} | {', '.join(map(str, d['steps']))} | " + " | ".join(cells) + " |")
    if res["probes"]:
        lines += ["", "What each discriminator rewards, before alignment (`bench/disc_probe.py` on the study's pool: "
                  "the teacher's demonstration against a public one of the same problem, by the public one's slip; "
                  "acc = share of pairs the teacher wins, gap = mean score difference; mean over the seeds). "
                  "Content shows as gaps on the slips and none on `none`; a gap on `none` as large as on the slips "
                  "is style:", "",
                  "| discriminator | public slip | seeds | pairs per seed | caption acc | caption gap | reasoning acc | "
                  "reasoning gap |", "|---|---|---|---|---|---|---|---|"]
        for name, kinds in res["probes"].items():
            for kind, m in kinds.items():
                cells = " | ".join(_num(m[k], signed=k.endswith("gap")) for k in PROBE_KEYS)
                lines.append(f"| {name} | {kind} | {m['seeds']} | {', '.join(map(str, m['pairs']))} | {cells} |")
    topped = {k: v for k, v in res["warmup_pairs"].items() if v["public_pairs_added"]}
    if topped:
        lines += ["", "Warm-up pairs topped up with public demonstrations (the SFT policy closed the format too "
                  "rarely): " + "; ".join(f"{k}: {v['policy_pairs']} policy + {v['public_pairs_added']} public"
                                          for k, v in topped.items())]
    if res.get("oom_retried"):
        lines += ["", "Started again after running out of GPU memory (times): "
                  + ", ".join(f"{n} ({k})" for n, k in res["oom_retried"].items())]
    if res["not_run"]:
        lines += ["", "Not run:", ""] + [f"- {k}: {v}" for k, v in sorted(res["not_run"].items())]
    return "\n".join(lines) + "\n"


def task_table(arms: dict) -> list[str]:
    """Accuracy % per task family (mean ± std over seeds), with the share cut off at the token
    limit where any was."""
    tasks = sorted({t for r in arms.values() for t in r.get("by_task", {})})
    if not tasks:
        return []
    lines = ["", "Accuracy % by task family (mean ± std over seeds; in brackets: % cut off at the token limit, "
             "where any was):", "", "| arm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for arm, r in arms.items():
        cells = []
        for t in tasks:
            d = r["by_task"].get(t, {})
            cut = d.get("cut")
            cells.append(_fmt(d.get("acc")) + (f" ({100 * cut[0]:.0f})" if cut and cut[0] > 0 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _num(v, signed: bool = False) -> str:
    return "-" if v is None else f"{v:+.2f}" if signed else f"{v:.2f}"


def write_report(out: Path, preset, arms: list[str], seeds: list[int], state: dict, jobs: dict, name: str,
                 gpus: int) -> str:
    res = collect(out, preset, arms, seeds, state, jobs)
    wall = max((st.get("start", 0) + st.get("wall_s", 0) for st in state.values()), default=0.0) / 60
    header = {"preset": name, "seeds": seeds, "gpus": gpus, "budget_min": preset.budget_min, "wall_min": wall}
    (out / "results.json").write_text(json.dumps({**header, **res}, indent=1, default=str))
    md = render(res, header)
    (out / "results.md").write_text(md)
    return md
