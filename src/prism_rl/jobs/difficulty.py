"""Difficulty filter: keep problems whose pass rate under a policy lies in [low, high].

METHOD.md section 3: the RLVR set is the problems whose pass rate under the post-alignment policy
is in [0.2, 0.8] over 16 rollouts. Problems the policy always or never solves give GRPO a
zero advantage for every sample, so they cost rollout time and teach nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..config import ModelConfig  # noqa: E402
from ..data.layouts import read_records, write_verl_parquet  # noqa: E402
from ..data.processing import encode_all  # noqa: E402
from ..data.records import BadRecords  # noqa: E402
from ..eval.sampling import generate_and_score  # noqa: E402
from ..models.loading import load_policy, pick_device, special_ids  # noqa: E402
from ..reward import compute_score  # noqa: E402
from ..rollout.base import SamplingParams  # noqa: E402
from ..rollout.hf import HFEngine  # noqa: E402


def pass_rates(model, processor, records, *, n: int, max_new_tokens: int, temperature: float = 1.0,
               batch_prompts: int = 16, max_prompt_length: int = 2048) -> list[float]:
    """Fraction of ``n`` sampled responses per record that the verifiable reward marks correct."""
    eos, _ = special_ids(processor)
    prompts = encode_all(processor, records, eos_id=eos, max_length=max_prompt_length, with_response=False)
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    accs = generate_and_score(HFEngine(model, processor), prompts, params, batch_prompts,
                              lambda rec, text, _tokens, _finish: compute_score(text, rec.ground_truth or "").acc,
                              desc="filter")
    # rows come prompt by prompt, n each; a float32 mean as before keeps the written rates identical
    return torch.tensor(accs).view(-1, n).mean(1).tolist()


def filter_difficulty(model_dir: str, data: str, out: str, *, n: int = 16, low: float = 0.2, high: float = 0.8,
                      max_new_tokens: int = 1024, temperature: float = 1.0, limit: int | None = None,
                      seed: int = 0, skip_bad: bool = False) -> dict:
    """Write the kept problems to ``out`` (verl parquet), a histogram PNG and stats JSON beside it."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    torch.manual_seed(seed)
    model, processor = load_policy(ModelConfig(path=model_dir), pick_device(), trainable=False)
    bad = BadRecords()
    records = read_records(data, skip_bad=skip_bad, bad=bad)
    records = records[:limit] if limit else records
    rates = pass_rates(model, processor, records, n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    kept = [r for r, p in zip(records, rates) if low <= p <= high]
    for r, p in zip(records, rates):
        r.extra["pass_rate"] = p
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_verl_parquet(kept, out_path)
    stats = {"input": len(records), "kept": len(kept), "n": n, "low": low, "high": high,
             "bad_records": bad.count, "always_solved": sum(p == 1.0 for p in rates),
             "never_solved": sum(p == 0.0 for p in rates),
             "mean_pass_rate": sum(rates) / max(len(rates), 1)}
    by_task: dict[str, list[float]] = {}
    for r, p in zip(records, rates):
        by_task.setdefault(r.task, []).append(p)
    stats["kept_by_task"] = {t: sum(low <= p <= high for p in v) for t, v in by_task.items()}
    out_path.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    plot_histogram(rates, low, high, n, out_path.with_suffix(".hist.png"))
    return stats


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
