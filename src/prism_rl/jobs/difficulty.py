"""Difficulty filter: keep problems whose pass rate under a policy lies in [low, high].

METHOD.md section 3: the RLVR set is the problems whose pass rate under the post-alignment policy
is in [0.2, 0.8] over 16 rollouts. Problems the policy always or never solves give GRPO a
zero advantage for every sample, so they cost rollout time and teach nothing.

Responses are sampled at RLVR's response limit by default: at a lower cap a long correct
answer is cut off and scored wrong, and the filter would drift toward short, easy problems.
Samples that hit the cap are counted apart in the stats. The kept problems are written as the
input's own rows (``data.subset.write_subset``), every column unchanged, plus ``pass_rate``
and ``truncated_samples``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..config import ConfigError, ModelConfig, rl_response_limit  # noqa: E402
from ..data.layouts import read_records  # noqa: E402
from ..data.processing import encode_all  # noqa: E402
from ..data.prompt_format import check_prompts  # noqa: E402
from ..data.records import BadRecords, DataError  # noqa: E402
from ..data.subset import write_subset  # noqa: E402
from ..eval.sampling import generate_and_score  # noqa: E402
from ..models.loading import load_policy, pick_device, special_ids  # noqa: E402
from ..reward import compute_score  # noqa: E402
from ..reward.builtins import builtin_reward  # noqa: E402
from ..reward.plugins import RewardFn, load_reward_option  # noqa: E402
from ..rollout import make_engine  # noqa: E402
from ..rollout.base import SamplingParams  # noqa: E402


@dataclass
class ProblemScore:
    """One problem's ``n`` samples: pass rate, samples that hit the token cap, and of those the wrong ones."""

    pass_rate: float
    truncated: int
    truncated_wrong: int


def score_problems(model, processor, records, *, n: int, max_new_tokens: int, temperature: float = 1.0,
                   batch_prompts: int = 16, max_prompt_length: int = 2048,
                   reward_fn: RewardFn | None = None) -> list[ProblemScore]:
    """Sample ``n`` responses per record; pass rate = (correct samples) / n under the verifiable
    reward (``reward_fn``, default the built-in PRISM reward).

    A sample that ends without EOS hit ``max_new_tokens`` (truncated): it is scored as it is,
    almost always wrong, so truncations are counted apart to show how much of a low pass rate
    is the cap's doing rather than the problem's.
    """
    score = reward_fn or compute_score
    eos, _ = special_ids(processor)
    prompts = encode_all(processor, records, eos_id=eos, max_length=max_prompt_length, with_response=False)
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    rows = generate_and_score(make_engine("auto", model, processor), prompts, params, batch_prompts,
                              lambda rec, text, _tokens, finish: (score(text, rec.ground_truth or "").acc,
                                                                   finish == "length"),
                              desc="filter")
    acc = torch.tensor([a for a, _ in rows]).view(-1, n)
    cut = torch.tensor([c for _, c in rows], dtype=torch.bool).view(-1, n)
    # a float32 mean as before keeps the written rates identical
    rates = acc.mean(1).tolist()
    return [ProblemScore(rate, int(c.sum()), int((c & (a == 0)).sum())) for rate, a, c in zip(rates, acc, cut)]


def filter_difficulty(model_dir: str, data: str, out: str, *, n: int = 16, low: float = 0.2, high: float = 0.8,
                      max_new_tokens: int | None = None, rl_config: str | None = None, temperature: float = 1.0,
                      limit: int | None = None, seed: int = 0, skip_bad: bool = False,
                      batch_prompts: int = 16, reward: str = "", check_prompt_format: bool = True) -> dict:
    """Write the kept problems to ``out``, a histogram PNG and stats JSON beside it.

    Kept: the problems with ``low <= pass rate <= high``. ``out`` holds their input rows as
    they were (every column, same layout as ``data``) plus ``pass_rate`` and
    ``truncated_samples``. ``max_new_tokens`` defaults to RLVR's response limit
    (``rl_response_limit``: ``rl_config``'s ``rollout.max_new_tokens``, else RLConfig's
    default), so a response RL would accept is not cut short and scored wrong here.
    ``reward`` names the reward whose accuracy is the pass rate (a built-in such as ``boxed``
    or ``path/to/file.py:function``; default the PRISM reward). The records are read and, with
    ``check_prompt_format``, their prompts checked against the reward's response format
    before the model is loaded, so bad input fails at once.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"need 0 <= --low <= --high <= 1, got low={low}, high={high}")
    if max_new_tokens is not None and rl_config:
        raise ConfigError("give --max-new-tokens or --rl-config, not both")
    limit_from = "max_new_tokens" if max_new_tokens is not None else (rl_config or "RLConfig default")
    max_new_tokens = max_new_tokens if max_new_tokens is not None else rl_response_limit(rl_config)
    reward_fn = load_reward_option(reward, "--reward")
    bad = BadRecords()
    records = read_records(data, skip_bad=skip_bad, bad=bad)
    records = records[:limit] if limit else records
    if not records:
        raise DataError(f"{data}: no problems to filter ({bad.summary()})")
    builtin = builtin_reward(reward)
    if check_prompt_format and builtin is not None:
        check_prompts(records, builtin.convention, f"--reward {builtin.name}",
                      ["pass --reward with the reward that scores the prompts' format (boxed for \\boxed{} answers, "
                       "or path/to/file.py:function)", "pass --no-prompt-check to filter anyway"])
    torch.manual_seed(seed)
    model, processor = load_policy(ModelConfig(path=model_dir), pick_device(), trainable=False)
    scores = score_problems(model, processor, records, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            batch_prompts=batch_prompts, reward_fn=reward_fn)
    kept = [(r, s) for r, s in zip(records, scores) if low <= s.pass_rate <= high]
    out_path = Path(out)
    write_subset(data, out_path, [r.index for r, _ in kept],
                 {"pass_rate": (float, [s.pass_rate for _, s in kept]),
                  "truncated_samples": (int, [s.truncated for _, s in kept])})
    stats = filter_stats(records, scores, n=n, low=low, high=high, bad_records=bad.count)
    stats["max_new_tokens"], stats["max_new_tokens_from"] = max_new_tokens, limit_from
    out_path.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    plot_histogram([s.pass_rate for s in scores], low, high, n, out_path.with_suffix(".hist.png"))
    return stats


def filter_stats(records, scores: list[ProblemScore], *, n: int, low: float, high: float, bad_records: int) -> dict:
    """Counts of the filter's decision, with truncation (samples at the token cap) reported apart."""
    rates = [s.pass_rate for s in scores]
    by_task: dict[str, list[float]] = {}
    for r, p in zip(records, rates):
        by_task.setdefault(r.task, []).append(p)
    truncated = sum(s.truncated for s in scores)
    return {"input": len(records), "kept": sum(low <= p <= high for p in rates), "n": n, "low": low, "high": high,
            "bad_records": bad_records, "always_solved": sum(p == 1.0 for p in rates),
            "never_solved": sum(p == 0.0 for p in rates),
            "mean_pass_rate": sum(rates) / max(len(rates), 1),
            "truncation": {
                "samples": n * len(scores), "truncated": truncated,
                "truncated_wrong": sum(s.truncated_wrong for s in scores),
                "truncated_rate": truncated / max(n * len(scores), 1),
                "problems_with_truncation": sum(s.truncated > 0 for s in scores),
                # dropped as too hard while some sample was cut off: the cap may be the cause
                "below_low_with_truncation": sum(s.pass_rate < low and s.truncated > 0 for s in scores),
            },
            "kept_by_task": {t: sum(low <= p <= high for p in v) for t, v in by_task.items()}}


def plot_histogram(rates: list[float], low: float, high: float, n: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [(i - 0.5) / n for i in range(n + 2)]
    ax.hist(rates, bins=bins, color="#4477aa", edgecolor="white")
    ax.axvspan(low, high, color="#ddaa33", alpha=0.25, label=f"kept [{low}, {high}]")
    ax.set_xlabel(f"pass rate over {n} samples")
    ax.set_ylabel("problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
