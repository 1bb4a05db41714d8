"""``prism eval`` on a held-out file: generate, report accuracy, format rate and length.

Every sample is scored with the verifiable reward (``prism_rl.reward``): accuracy on the
``<answer>`` content, format validity of the whole response. The summary is broken down by
task family; with ``n > 1`` samples per prompt it also reports the share of prompts whose
pass rate lies strictly between 0 and 1 (the prompts an RL stage can learn from).

Results go to ``<output_dir>/<run>/heldout-<file stem>/`` (``prism_rl.eval.layout``):
samples are appended batch by batch, so a rerun of the same model resumes, and the comparison
table in ``<output_dir>`` is rebuilt at the end (``prism_rl.eval.report``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from .. import distributed as D
from ..config import ConfigError, EvalConfig, save_config
from ..data.images import configure_images
from ..data.records import BadField, BadRecords, Record, report_bad
from ..reward import compute_score
from ..rollout.base import SamplingParams
from .layout import atomic_write, claim_run, heldout_part, model_id, prepare_part, read_rows
from .perception import record_perception
from .ranks import gather_rows, my_records
from .report import write_report
from .sampling import generate_and_score

__all__ = ["HELDOUT_SETTINGS", "evaluate", "format_table", "score_samples", "summarize"]

# settings that change what a sample is: a resumed run must not mix two of them in one file
# (the file too: ids such as "test-3" repeat across files with the same name)
HELDOUT_SETTINGS = ("model", "data", "max_new_tokens", "temperature", "top_p", "n", "seed", "max_prompt_length",
                    "max_pixels", "min_pixels")


def score_samples(engine, prompts, params: SamplingParams, batch_size: int, desc: str = "eval", *,
                  encode: Callable | None = None, sink: Callable[[list], None] | None = None) -> list[dict]:
    """Generate for every prompt and score each sample with the verifiable reward: one row per
    sample (id, task, sample index, question, ground truth, response, answer, acc, format,
    score, tokens, finish reason; and ``perception``, the caption's perception score, when the
    record has a ``scene``). ``encode`` and ``sink`` go to :func:`generate_and_score`."""
    # rows come prompt by prompt, params.n samples each: the k-th row is sample k % n
    row_index = itertools.count()

    def score(rec, text: str, n_tok: int, finish: str) -> dict:
        si = next(row_index) % params.n
        res = compute_score(text, rec.ground_truth or "")
        row = {"id": rec.id, "task": rec.task, "sample": si, "question": rec.question,
               "ground_truth": rec.ground_truth, "response": text, "answer": res.answer,
               "acc": res.acc, "format": res.format, "score": res.score, "tokens": n_tok,
               "finish": finish}
        perception = record_perception(rec, text)
        if perception is not None:   # synthetic problems carry their scene (eval/perception.py)
            row["perception"] = perception
        return row

    return generate_and_score(engine, prompts, params, batch_size, score, desc=desc, encode=encode, sink=sink)


def summarize(rows: list[dict]) -> dict:
    """Accuracy, format rate, mean response tokens (overall and per task), the share of
    prompts with a pass rate strictly between 0 and 1, and the mean perception score over the
    samples that have one (``perception``; absent when none has)."""
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
            **_perception_mean(sub),
        }
    tasks = sorted({r["task"] for r in rows})
    return {"overall": stats(rows), "per_task": {t: stats([r for r in rows if r["task"] == t]) for t in tasks}}


def _perception_mean(rows: list[dict]) -> dict:
    """``{"perception": mean, "n_perception": count}`` over rows with a score, else ``{}``."""
    vals = [r["perception"] for r in rows if r.get("perception") is not None]
    return {"perception": sum(vals) / len(vals), "n_perception": len(vals)} if vals else {}


def _unique(records: list[Record], skip_bad: bool, bad: BadRecords) -> list[Record]:
    """Records with distinct ids (results are kept, and resumed, by id)."""
    first: dict[str, int] = {}
    out = []
    for rec in records:
        if rec.id in first:
            report_bad(rec.where(), BadField("id", f"duplicate id {rec.id!r} (record {first[rec.id]} has it too); "
                                                   f"held-out results are kept by id"), skip_bad, bad)
            continue
        first[rec.id] = rec.index
        out.append(rec)
    return out


def _finished(samples: Path, n: int) -> dict[str, list[dict]]:
    """Rows of the prompts that have all ``n`` samples in ``samples``; the rows of a prompt cut
    short by an interruption are removed from the file (they are generated again)."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    rows = read_rows(samples)
    for r in rows:
        by_id[str(r["id"])].append(r)
    done = {k: v for k, v in by_id.items() if sorted(r.get("sample", 0) for r in v) == list(range(n))}
    if len(done) != len(by_id):
        atomic_write(samples, "".join(json.dumps(r) + "\n" for v in done.values() for r in v))
    return done


def _load(cfg: EvalConfig):
    from .. import distributed as D
    from ..models.loading import load_policy, set_pixel_limits

    model, processor = load_policy(cfg.model, D.init_from_env(), trainable=False)   # torchrun: cuda:LOCAL_RANK
    set_pixel_limits(processor, cfg.data.max_pixels, cfg.data.min_pixels)
    return model, processor


def _generate(cfg: EvalConfig, todo: list[Record], model, processor, params: SamplingParams,
              samples: Path, bad: BadRecords, done: int) -> list[dict]:
    """Generate and score ``todo``, appending each batch's rows to ``samples``."""
    import torch

    from ..data.processing import encode_all
    from ..models.loading import special_ids
    from ..rollout import make_engine

    eos, _ = special_ids(processor)
    torch.manual_seed(cfg.generation.seed)

    def encode(chunk: list[Record]) -> list:
        return encode_all(processor, chunk, eos_id=eos, max_length=cfg.data.max_prompt_length,
                          with_response=False, skip_bad=cfg.data.skip_bad, bad=bad)

    def append(rows: list[dict]) -> None:
        with samples.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    engine = make_engine("auto", model, processor)   # the graph engine on CUDA
    mine = my_records(todo)                           # torchrun: this rank's share; rank 0 appends its batches
    return gather_rows(lambda: score_samples(engine, mine, params, cfg.generation.batch_size, desc="eval",
                                             encode=encode, sink=append if D.is_main() else None), todo, bad)


def evaluate(cfg: EvalConfig, model=None, processor=None, *, fresh: bool = False,
             announce: Callable[[dict], None] | None = None, report: bool = True) -> dict:
    """Evaluate ``cfg.model.path`` on ``cfg.data.eval``; returns the summary.

    Writes ``samples.jsonl``, ``meta.json``, ``config.yaml`` and ``summary.json`` under
    ``<output_dir>/<run>/heldout-<stem>/`` (run = ``cfg.name``, or derived from the model's
    path). Prompts whose samples are all there already are not generated again (the model
    is not loaded when nothing is left); other sampling settings are refused unless
    ``fresh``, which starts over. ``announce`` gets the settings in force before generation.
    """
    from ..data.processing import read_limited

    if not cfg.data.eval:
        raise ConfigError("data.eval (--data): no held-out file to evaluate on")
    check_no_offload(cfg)
    D.init_from_env()   # under torchrun: join the group; each rank generates a share (ranks.py), rank 0 writes
    configure_images(cfg.data)
    g = cfg.generation
    meta = {"data": str(Path(cfg.data.eval).resolve()), "model": model_id(cfg.model.path), "max_new_tokens": g.max_new_tokens,
            "temperature": g.temperature, "top_p": g.top_p, "n": g.n, "seed": g.seed,
            "max_prompt_length": cfg.data.max_prompt_length, "max_pixels": cfg.data.max_pixels,
            "min_pixels": cfg.data.min_pixels}

    finished: dict[str, list[dict]] = {}   # rank 0's: the rows done before; the other ranks get their ids

    def claim() -> tuple[str, Path, list[str]]:
        run, run_dir = claim_run(cfg.output_dir, cfg.name or None, cfg.model.path)
        out = run_dir / heldout_part(cfg.data.eval)
        prepare_part(out, meta, HELDOUT_SETTINGS, fresh)
        save_config(cfg, out)
        finished.update(_finished(out / "samples.jsonl", g.n))
        return run, out, list(finished)

    run, out, done_ids = D.from_main(claim)   # rank 0 claims the folder and reads what is done
    bad = BadRecords()
    records = _unique(read_limited(cfg.data.eval, cfg.data.limit, cfg.data.skip_bad, bad), cfg.data.skip_bad, bad)
    samples = out / "samples.jsonl"
    done = set(done_ids)
    todo = [r for r in records if r.id not in done]
    params = SamplingParams(n=g.n, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
    if announce is not None and D.is_main():
        announce({"data": cfg.data.eval, "n_records": len(records), "done": len(records) - len(todo),
                  "params": params, "out": out, "run": run})
    t0, new_rows = time.time(), []
    if todo:
        if model is None:
            model, processor = _load(cfg)
        new_rows = _generate(cfg, todo, model, processor, params, samples, bad, len(records) - len(todo))
    wall = time.time() - t0

    def write() -> dict:   # rank 0 (one process: the process)
        if D.is_distributed() and new_rows:   # the samples file as one process leaves it: done before, then new
            done_rows = [*itertools.chain(*finished.values()), *new_rows]
            atomic_write(samples, "".join(json.dumps(r) + "\n" for r in done_rows))
        by_id = _finished(samples, g.n)
        summary = summarize([r for rec in records for r in by_id.get(rec.id, [])])
        summary.update(name=run, run=run, model=meta["model"], data=cfg.data.eval, n=g.n, temperature=g.temperature,
                       settings={k: meta[k] for k in HELDOUT_SETTINGS[2:]}, generated_now=len(new_rows) // g.n,
                       resumed=len(records) - len(todo), wall_s=wall, bad_records=bad.count,
                       gen_tokens_per_s=sum(r["tokens"] for r in new_rows) / max(wall, 1e-9))
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        if report:
            summary["report_files"] = {k: str(v) for k, v in write_report(cfg.output_dir).items()}
        return summary

    return D.from_main(write)   # torchrun: every rank returns rank 0's summary (or raises its error)


def check_no_offload(cfg: EvalConfig) -> None:
    """Evaluation never shards the policy (each torchrun rank loads the full weights), so
    ``model.cpu_offload`` would be ignored: an error naming it."""
    if cfg.model.cpu_offload:
        raise ConfigError("model.cpu_offload=true: evaluation does not shard the policy (each torchrun process "
                          "loads the full weights); set model.cpu_offload=false")


def format_table(summaries: list[dict]) -> str:
    """A Markdown table: one row per summary, accuracy per task, average, format, tokens (and
    the perception score when a summary has one)."""
    tasks = sorted({t for s in summaries for t in s["per_task"]})
    perception = any("perception" in s["overall"] for s in summaries)
    head = ["run"] + tasks + ["avg acc", "format", "resp tokens"] + (["perception"] if perception else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.get("name", "?")]
        cells += [f"{100 * s['per_task'][t]['accuracy']:.1f}" if t in s["per_task"] else "-" for t in tasks]
        o = s["overall"]
        cells += [f"{100 * o['accuracy']:.1f}", f"{100 * o['format_rate']:.1f}", f"{o['mean_response_tokens']:.0f}"]
        if perception:
            cells.append(f"{100 * o['perception']:.1f}" if "perception" in o else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
