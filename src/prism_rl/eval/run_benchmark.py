"""Running a benchmark evaluation: generate, score, judge, resume, summarise, report.

``evaluate_benchmark`` evaluates one model on one benchmark into a run folder
(``<root>/<run>/<benchmark>/``, the layout of ``prism_rl.eval.layout``): it appends each
finished record to ``samples.jsonl`` (a rerun skips finished ids), scores the ``<answer>``
content with the verifiable reward's rules, asks the optional LLM judge only about answers the
rules call wrong, writes ``summary.json`` and rebuilds the comparison table in ``<root>``
(``prism_rl.eval.report``). ``prism eval --benchmark`` runs it through
``prism_rl.eval.command``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config import ModelConfig
from ..data.records import BadRecords, Record
from .benchmark_scoring import judge_rows, score_response, summarize_benchmark
from .benchmark_table import get_benchmark
from .layout import claim_run, model_id, prepare_part, read_rows
from .loaders import load_benchmark
from .report import write_report
from .sampling import generate_and_score

__all__ = ["SETTINGS", "evaluate_benchmark", "read_samples"]

log = logging.getLogger(__name__)

# settings that change what a sample is: a resumed run must not mix two of them in one file
SETTINGS = ("model", "max_new_tokens", "temperature", "top_p", "seed", "max_prompt_length",
            "max_pixels", "min_pixels")


def read_samples(path: str | Path) -> dict[str, dict]:
    """Rows of a ``samples.jsonl`` by id (last wins); a torn last line is cut off."""
    return {str(r["id"]): r for r in read_rows(Path(path))}


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


def _load_model(model_cfg: ModelConfig, max_pixels: int | None, min_pixels: int | None):
    from ..models.loading import load_policy, pick_device, set_pixel_limits

    model, processor = load_policy(model_cfg, pick_device(), trainable=False)
    set_pixel_limits(processor, max_pixels, min_pixels)
    return model, processor


def _generate(todo: list[Record], model, processor, params, *, batch_size: int,
              max_prompt_length: int, skip_bad: bool, bad: BadRecords, judge, samples: Path,
              desc: str, done: int) -> int:
    """Generate, score, judge and append rows batch by batch; returns rows written."""
    from ..data.processing import encode_all
    from ..models.loading import special_ids
    from ..rollout import make_engine

    engine = make_engine("auto", model, processor)   # the graph engine on CUDA
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
                       fresh: bool = False, max_new_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int = 0, skip_bad: bool = False, max_prompt_length: int = 32768,
                       max_pixels: int | None = None, min_pixels: int | None = None,
                       split: str | None = None, model_cfg: ModelConfig | None = None,
                       model=None, processor=None, report: bool = True,
                       announce: Callable[[dict], None] | None = None) -> dict:
    """Evaluate ``model_dir`` on benchmark ``name`` read from ``path``; returns the summary.

    ``out_dir`` is the run folder (``<root>/<run>``; ``run.json`` there names the model, and
    another model is refused). Samples go to ``out_dir/<benchmark>/samples.jsonl``, one line
    per finished record, written after each batch; a rerun skips the ids already there (the
    model is not even loaded when nothing is left) and, given a judge, asks it about earlier
    rule-wrong answers that have no verdict yet; ``fresh`` starts the benchmark over.
    Sampling defaults come from ``BENCHMARKS[name]``; ``max_new_tokens``/``temperature``/
    ``top_p`` override them. ``announce`` gets the settings in force before generation starts.
    ``summary["notes"]`` says which files of a folder were read when it held the split twice,
    and what the headline could not include (a missing MMMU-Pro setting, incomplete WeMath
    problems, MathVerse's Text Only records).
    With ``report`` the comparison table in ``out_dir``'s parent is rebuilt.
    """
    import torch

    from ..rollout.base import SamplingParams

    spec = get_benchmark(name)
    run_dir = Path(out_dir)
    claim_run(run_dir.parent, run_dir.name, model_dir)
    out = run_dir / spec.name
    bad, notes = BadRecords(), []
    records = load_benchmark(spec.name, path, limit=limit, skip_bad=skip_bad, bad=bad, split=split, notes=notes)
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens or spec.max_new_tokens,
                            temperature=spec.temperature if temperature is None else temperature,
                            top_p=spec.top_p if top_p is None else top_p)
    meta = {"benchmark": spec.name, "data": str(path), "model": model_id(model_dir),
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "seed": seed, "max_prompt_length": max_prompt_length,
            "max_pixels": max_pixels, "min_pixels": min_pixels}
    prepare_part(out, meta, SETTINGS, fresh)
    samples = out / "samples.jsonl"
    done = read_samples(samples)
    todo = [r for r in records if r.id not in done]
    if announce is not None:
        announce({"benchmark": spec.name, "split": split or spec.split, "n_records": len(records),
                  "done": len(records) - len(todo), "params": params, "out": out, "run": run_dir.name})
    t0, written = time.time(), 0
    if todo:
        if model is None:
            model, processor = _load_model(model_cfg or ModelConfig(path=str(model_dir)), max_pixels, min_pixels)
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
    summary.update(run=run_dir.name, model=meta["model"], data=str(path),
                   settings={k: meta[k] for k in SETTINGS[1:]},
                   judge_model=getattr(judge, "model", None), generated_now=written, rejudged=rejudged,
                   resumed=len(records) - len(todo), bad_records=bad.count,
                   bad_summary=bad.summary(), wall_s=time.time() - t0, notes=notes + summary["notes"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        summary["report_files"] = {k: str(v) for k, v in write_report(run_dir.parent).items()}
    return summary
