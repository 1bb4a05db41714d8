"""Running a benchmark evaluation: generate, score, judge, resume, summarise, report.

``evaluate_benchmark`` generates in batches (``HFEngine``), appends each finished record to
``out_dir/<benchmark>/samples.jsonl`` (a rerun skips finished ids), scores the ``<answer>``
content with the verifiable reward's rules, asks the optional LLM judge only about answers the
rules call wrong, and adds the summary to the runs table (``prism_rl.eval.report``).
``run_eval`` is what ``prism eval --benchmark`` runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.records import BadRecords, Record
from .benchmark_scoring import judge_rows, score_response, summarize_benchmark
from .benchmark_table import get_benchmark
from .judge import Judge
from .loaders import load_benchmark
from .report import load_results, results_markdown, update_results
from .sampling import generate_and_score

__all__ = ["evaluate_benchmark", "read_samples", "run_eval"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- samples file


def read_samples(path: str | Path) -> dict[str, dict]:
    """Rows of a ``samples.jsonl`` by id (last wins); a torn last line is ignored."""
    p = Path(path)
    rows: dict[str, dict] = {}
    if not p.exists():
        return rows
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write
            if isinstance(row, dict) and "id" in row:
                rows[str(row["id"])] = row
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (an interrupted write) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _check_meta(out: Path, meta: dict, resume: bool) -> None:
    """Refuse to mix samples of another model or other sampling settings into one file."""
    meta_path, samples = out / "meta.json", out / "samples.jsonl"
    if resume and meta_path.exists() and samples.exists():
        old = json.loads(meta_path.read_text())
        keys = ("model", "max_new_tokens", "temperature", "top_p")
        diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k) != meta[k]}
        if diff:
            raise ValueError(f"{samples} holds samples made with other settings {diff}; "
                             f"use another out_dir or resume=False")
    if not resume and samples.exists():
        samples.unlink()
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))


_NOT_JUDGED = ("off", "error", "unparsed")


def _rejudge(samples: Path, ids: set[str], records: dict[str, Record], judge, chunk: int = 64) -> int:
    """Judge earlier rows (``ids``) that the rules call wrong and that never got a verdict
    (no judge then, or it failed), and rewrite the samples file; returns how many were asked."""
    rows = list(read_samples(samples).values())
    todo = [r for r in rows if r["id"] in ids and r["id"] in records and not r["rule_acc"]
            and r.get("judge") in _NOT_JUDGED]
    if not todo:
        return 0
    for start in range(0, len(todo), chunk):
        judge_rows(todo[start:start + chunk], records, judge)
    tmp = samples.with_name(samples.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, samples)
    return len(todo)


# --------------------------------------------------------------------------- evaluation


def _load_model(model_dir: str | Path, max_pixels: int | None):
    from ..config import ModelConfig
    from ..models.loading import load_policy, load_processor, pick_device

    model, processor = load_policy(ModelConfig(path=str(model_dir)), pick_device(), trainable=False)
    if max_pixels is not None:
        processor = load_processor(model_dir, max_pixels=max_pixels)
    return model, processor


def _generate(todo: list[Record], model, processor, params, *, batch_size: int,
              max_prompt_length: int, skip_bad: bool, bad: BadRecords, judge, samples: Path,
              desc: str, done: int) -> int:
    """Generate, score, judge and append rows batch by batch; returns rows written."""
    from ..data.processing import encode_all
    from ..models.loading import special_ids
    from ..rollout.hf import HFEngine

    engine = HFEngine(model, processor)
    eos, _ = special_ids(processor)
    by_id = {r.id: r for r in todo}

    def encode(chunk: list[Record]) -> list:
        return encode_all(processor, chunk, eos_id=eos, max_length=max_prompt_length,
                          with_response=False, skip_bad=skip_bad, bad=bad)

    def append(rows: list[dict]) -> None:
        if judge is not None:
            judge_rows(rows, by_id, judge)
        with samples.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    rows = generate_and_score(engine, todo, params, batch_size, score_response, sink=append,
                              encode=encode, desc=desc, done=done)
    return len(rows)


def evaluate_benchmark(name: str, path: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                       judge=None, batch_size: int = 8, limit: int | None = None,
                       resume: bool = True, max_new_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int = 0, run_name: str | None = None,
                       results_dir: str | Path | None = None, skip_bad: bool = False,
                       max_prompt_length: int = 32768, max_pixels: int | None = None,
                       split: str | None = None, model=None, processor=None,
                       report: bool = True) -> dict:
    """Evaluate ``model_dir`` on benchmark ``name`` read from ``path``; returns the summary.

    Samples go to ``out_dir/<benchmark>/samples.jsonl``, one line per finished record,
    written after each batch; with ``resume`` a rerun skips the ids already there (the model
    is not even loaded when nothing is left) and, given a judge, asks it about earlier
    rule-wrong answers that have no verdict yet. ``summary.json`` sits beside them. Sampling
    defaults come from ``BENCHMARKS[name]``; ``max_new_tokens``/``temperature``/``top_p``
    override them. ``judge`` (a :class:`prism_rl.eval.judge.Judge`) is asked only about
    answers the rules call wrong. With ``report`` the summary is added to the runs table in
    ``results_dir`` (default: the parent of ``out_dir``) under ``run_name`` (default: the
    name of ``out_dir``).
    """
    import torch

    from ..rollout.base import SamplingParams

    spec = get_benchmark(name)
    out = Path(out_dir) / spec.name
    bad = BadRecords()
    records = load_benchmark(spec.name, path, limit=limit, skip_bad=skip_bad, bad=bad, split=split)
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens or spec.max_new_tokens,
                            temperature=spec.temperature if temperature is None else temperature,
                            top_p=spec.top_p if top_p is None else top_p)
    meta = {"benchmark": spec.name, "data": str(path), "model": str(model_dir),
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "seed": seed}
    _check_meta(out, meta, resume)
    samples = out / "samples.jsonl"
    _repair_tail(samples)
    done = read_samples(samples)
    todo = [r for r in records if r.id not in done]
    t0, written = time.time(), 0
    if todo:
        if model is None:
            model, processor = _load_model(model_dir, max_pixels)
        torch.manual_seed(seed)
        written = _generate(todo, model, processor, params, batch_size=batch_size,
                            max_prompt_length=max_prompt_length, skip_bad=skip_bad, bad=bad,
                            judge=judge, samples=samples, desc=spec.name,
                            done=len(records) - len(todo))
    rejudged = _rejudge(samples, set(done), {r.id: r for r in records}, judge) if judge else 0
    if bad.count:
        log.warning("%s: %s", spec.name, bad.summary())
    rows_by_id = read_samples(samples)
    rows = [rows_by_id[r.id] for r in records if r.id in rows_by_id]
    summary = summarize_benchmark(spec.name, rows)
    summary.update(run=run_name or Path(out_dir).name, model=str(model_dir), data=str(path),
                   settings={k: meta[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")},
                   judge_model=getattr(judge, "model", None), generated_now=written, rejudged=rejudged,
                   resumed=len(records) - len(todo), bad_records=bad.count,
                   bad_summary=bad.summary(), wall_s=time.time() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        summary["report_files"] = {k: str(v) for k, v in update_results(
            results_dir or Path(out_dir).parent, summary["run"], spec.name, summary).items()}
    return summary


def run_eval(benchmark: str, data: str | Path, model: str | Path, *,
             out_dir: str | Path | None = None, judge_url: str | None = None,
             judge_model: str | None = None, judge_api_key_env: str = "PRISM_JUDGE_API_KEY",
             judge_timeout: float = 60.0, print_fn: Callable[[str], None] = print,
             **kwargs: Any) -> dict:
    """What ``prism eval --benchmark NAME --data PATH --model DIR [--judge-url U --judge-model M]``
    runs: builds the judge when a URL is given, evaluates, prints a one-line summary and the
    runs table. ``out_dir`` defaults to ``runs/eval/<model folder name>``; other keyword
    arguments go to :func:`evaluate_benchmark`."""
    judge = None
    if judge_url:
        if not judge_model:
            raise ValueError("--judge-url needs --judge-model")
        judge = Judge(judge_url, judge_model, api_key_env=judge_api_key_env, timeout=judge_timeout)
    out = Path(out_dir) if out_dir else Path("runs/eval") / Path(model).name
    s = evaluate_benchmark(benchmark, data, model, out, judge=judge, **kwargs)
    print_fn(f"{s['label']}: accuracy {100 * s['accuracy']:.1f}% (rules {100 * s['rule_accuracy']:.1f}%), "
             f"format {100 * s['format_rate']:.1f}%, {s['mean_response_tokens']:.0f} response tokens, "
             f"{s['n_records']} records ({s['generated_now']} generated now), judged {s['judged']} "
             f"(flipped {s['judge_flipped']}, failed {s['judge_failed']})")
    if "report_files" in s:
        print_fn(results_markdown(load_results(Path(s["report_files"]["json"]).parent)))
    return s
