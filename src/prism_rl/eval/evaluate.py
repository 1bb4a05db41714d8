"""``prism eval``: generate on a held-out file and report accuracy, format rate and length.

Every sample is scored with the verifiable reward (``prism_rl.reward``): accuracy on the
``<answer>`` content, format validity of the whole response. The summary is broken down by
task family; with ``n > 1`` samples per prompt it also reports the share of prompts whose
pass rate lies strictly between 0 and 1 (the prompts an RL stage can learn from).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import EvalConfig, save_config
from ..data.processing import load_prompts
from ..data.records import BadRecords
from ..models.loading import load_policy, pick_device, special_ids
from ..reward import compute_score
from ..rollout.base import SamplingParams
from ..rollout.hf import HFEngine
from .sampling import generate_and_score


def score_samples(engine: HFEngine, prompts, params: SamplingParams, batch_size: int, desc: str = "eval") -> list[dict]:
    """Generate for every prompt and score each sample with the verifiable reward: one row per
    sample (id, task, sample index, question, ground truth, response, answer, acc, format,
    score, tokens, finish reason)."""
    # rows come prompt by prompt, params.n samples each: the k-th row is sample k % n
    row_index = itertools.count()

    def score(rec, text: str, n_tok: int, finish: str) -> dict:
        si = next(row_index) % params.n
        res = compute_score(text, rec.ground_truth or "")
        return {"id": rec.id, "task": rec.task, "sample": si, "question": rec.question,
                "ground_truth": rec.ground_truth, "response": text, "answer": res.answer,
                "acc": res.acc, "format": res.format, "score": res.score, "tokens": n_tok,
                "finish": finish}

    return generate_and_score(engine, prompts, params, batch_size, score, desc=desc)


def summarize(rows: list[dict]) -> dict:
    """Accuracy, format rate, mean response tokens (overall and per task), and the share of
    prompts with a pass rate strictly between 0 and 1."""
    def stats(sub: list[dict]) -> dict:
        by_prompt = defaultdict(list)
        for r in sub:
            by_prompt[r["id"]].append(r["acc"])
        rates = [sum(v) / len(v) for v in by_prompt.values()]
        return {
            "n_prompts": len(by_prompt), "n_samples": len(sub),
            "accuracy": sum(r["acc"] for r in sub) / max(len(sub), 1),
            "format_rate": sum(r["format"] for r in sub) / max(len(sub), 1),
            "mean_response_tokens": sum(r["tokens"] for r in sub) / max(len(sub), 1),
            "truncated_rate": sum(r["finish"] == "length" for r in sub) / max(len(sub), 1),
            "mixed_pass_frac": sum(0 < x < 1 for x in rates) / max(len(rates), 1),
            "pass_at_n": sum(x > 0 for x in rates) / max(len(rates), 1),
        }
    tasks = sorted({r["task"] for r in rows})
    return {"overall": stats(rows), "per_task": {t: stats([r for r in rows if r["task"] == t]) for t in tasks}}


def evaluate(cfg: EvalConfig, model=None, processor=None) -> dict:
    """Run the evaluation; writes ``samples.jsonl`` and ``summary.json`` under ``output_dir``."""
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    device = pick_device()
    if model is None:
        model, processor = load_policy(cfg.model, device, trainable=False)
    torch.manual_seed(cfg.generation.seed)
    eos, _ = special_ids(processor)
    bad = BadRecords()
    prompts = load_prompts(cfg.data.eval, processor, eos_id=eos, max_length=cfg.data.max_prompt_length,
                           limit=cfg.data.limit, skip_bad=cfg.data.skip_bad, bad=bad)
    g = cfg.generation
    params = SamplingParams(n=g.n, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
    t0 = time.time()
    rows = score_samples(HFEngine(model, processor, device), prompts, params, g.batch_size)
    wall = time.time() - t0
    with (out / "samples.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = summarize(rows)
    summary.update(name=cfg.name or str(cfg.model.path), model=str(cfg.model.path), data=cfg.data.eval,
                   n=g.n, temperature=g.temperature, wall_s=wall, bad_records=bad.count,
                   gen_tokens_per_s=sum(r["tokens"] for r in rows) / max(wall, 1e-9))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summaries: list[dict]) -> str:
    """A Markdown table: one row per summary, accuracy per task, average, format, tokens."""
    tasks = sorted({t for s in summaries for t in s["per_task"]})
    head = ["run"] + tasks + ["avg acc", "format", "resp tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.get("name", "?")]
        cells += [f"{100 * s['per_task'][t]['accuracy']:.1f}" if t in s["per_task"] else "-" for t in tasks]
        o = s["overall"]
        cells += [f"{100 * o['accuracy']:.1f}", f"{100 * o['format_rate']:.1f}", f"{o['mean_response_tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
