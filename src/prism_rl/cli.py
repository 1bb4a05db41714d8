"""``prism <command>``: thin wrappers that parse a config and call one stage.

Training and evaluation commands take ``--config FILE.yaml`` plus dotted overrides
(``train.lr=2e-4 data.skip_bad=true``); bad keys or values exit with a message naming them.
Every user error (a bad option, config key, data file, record or field) ends the command with
``prism <command>: error: ...`` on stderr and exit status 2, without a traceback (``-v``
shows one). SIGTERM or SIGINT stops a training command after its current step with a
checkpoint and exit status 0; a second one ends it at once with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, SFTConfig, load_config, rl_response_limit
from .data.records import DataError
from .reward.batch import RewardInputError
from .reward.math_verify_pool import MathVerifyUnavailable
from .trainers.interrupt import Abort

# What a user can get wrong (options, config, files, records, fields); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, RewardInputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)

REWARD_HELP = """\
Input: JSONL, one object per line:
  response      (string, required) the model's full response text
  ground_truth  (string, number or list of them, required) the reference answer; a list is
                one multi-value answer, compared without regard to order
  any other field is copied to the output unchanged
Output: every line with "score", "acc" (0/1) and "format" (0/1) added, to --output or stdout;
a summary {n, mean_score, mean_acc, format_rate} on stderr. A bad line (bad JSON, not UTF-8, a
lone surrogate escape, a missing or mistyped field) stops the command before anything is
written, naming the file, line and field; so does a file without records. --output is written
through a temporary file: whole, or not at all.

Rewards (--reward-fn):
  prism (default)  score = 0.8 acc + 0.2 when the whole response is
                   <caption>...</caption><think>...</think><answer>...</answer>, else 0;
                   acc from <answer>
  boxed            score = 0.8 acc + 0.2 format; format = <think>...</think> then \\boxed{...};
                   acc from the last \\boxed{...} (verl geo3k style data)
  FILE.py:FN       your function (response, ground_truth, **kw) -> float | dict | RewardResult
"""

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")


def _number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: ``kind`` of the text, within ``[low, high]`` (argparse names the option)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


POSITIVE, NON_NEGATIVE, FRACTION = _number(int, 1), _number(int, 0), _number(float, 0.0, 1.0)


def _add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint (settings that "
                   "change the training trajectory must equal the checkpoint's)")
    p.add_argument("--resume-with-changes", action="store_true", help="--resume, continuing with the given settings "
                   "even where they differ from the checkpoint's (config.yaml records both)")
    p.add_argument("--halt-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")


def _resume(a) -> bool | str:
    """The trainers' ``resume`` argument: False, True, or ``"with-changes"``."""
    from .trainers.resume_config import RESUME_WITH_CHANGES
    return RESUME_WITH_CHANGES if a.resume_with_changes else a.resume


def _add_response_limit_args(p: argparse.ArgumentParser) -> None:
    """Sampling jobs that feed later stages default to RLVR's response limit (a lower cap cuts long
    correct answers short, and they count as wrong)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help=f"response token limit (default: RLVR's rollout.max_new_tokens, {rl_response_limit()})")
    g.add_argument("--rl-config", default=None, help="read the limit from this RL config's rollout.max_new_tokens")


def cmd_data_synth(a) -> None:
    from .data.synth import FAMILIES, synthesize
    kwargs = {"image_size": a.image_size, "public_error_rate": a.public_error_rate, "teacher_frac": a.teacher_frac,
              "public_style": a.public_style, "test_frac": a.test_frac, "align_frac": a.align_frac}
    if a.families:
        kwargs["families"] = a.families.split(",")
        unknown = [f for f in kwargs["families"] if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"--families: unknown {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")
    stats = synthesize(a.out, a.n, a.seed, **kwargs)
    print(json.dumps(stats, indent=2))


def cmd_data_show(a) -> None:
    from .data.show import show
    from .eval.loaders import load_benchmark
    out = a.out or str(Path(a.file).with_suffix("")) + "_sheet.png"
    blocks = show(a.file, out, k=a.k, benchmark_reader=lambda name, path, k: load_benchmark(name, path, limit=k))
    if len(blocks) > 1:  # the first block is the layout line
        print(f"contact sheet: {out}")


def cmd_data_convert(a) -> None:
    from .data.prompt_format import convert_file
    print(json.dumps(convert_file(a.file, a.out, prism_format=a.prism_format)))


def cmd_data_filter(a) -> None:
    from .jobs.difficulty import filter_difficulty
    if a.low > a.high:
        raise ConfigError(f"--low {a.low} is above --high {a.high}")
    stats = filter_difficulty(a.model, a.data, a.out, n=a.n, low=a.low, high=a.high,
                              max_new_tokens=a.max_new_tokens, rl_config=a.rl_config, limit=a.limit,
                              seed=a.seed, batch_prompts=a.batch_prompts, reward=a.reward,
                              check_prompt_format=not a.no_prompt_check)
    print(json.dumps(stats, indent=2))
    cut = stats["truncation"]
    if cut["truncated"]:
        print(f"{cut['truncated']} of {cut['samples']} samples hit max_new_tokens={stats['max_new_tokens']} "
              f"({cut['truncated_wrong']} of them scored wrong; {cut['below_low_with_truncation']} problems "
              "dropped as too hard had a truncated sample)", file=sys.stderr)


def cmd_data_curate(a) -> None:
    from .data.curate import CurationError, Endpoint, curate
    if (a.judge_url is None) != (a.judge_model is None):
        raise ConfigError("--judge-url and --judge-model go together")
    logging.getLogger("prism_rl.data.curate").setLevel(logging.INFO)
    teacher = Endpoint(a.teacher_url, a.teacher_model, a.teacher_key_env)
    judge = Endpoint(a.judge_url, a.judge_model, a.judge_key_env) if a.judge_url else None
    try:
        report = curate(a.problems, a.out, teacher=teacher, judge=judge, disambiguate=a.disambiguate,
                        max_attempts=a.max_attempts, concurrency=a.concurrency, timeout_s=a.timeout,
                        max_retries=a.max_retries, backoff_base_s=a.backoff_base, max_tokens=a.max_tokens,
                        alignment_share=a.alignment_share, seed=a.seed)
    except CurationError as e:
        raise ConfigError(str(e)) from None
    summary = {k: getattr(report, k) for k in ("problems", "accepted", "rejected", "sft", "alignment",
                                               "retries_by_cause")}
    summary["problems_per_min"] = report.run["problems_per_min"]
    print(json.dumps(summary))


def cmd_data_build_pairs(a) -> None:
    from .data.pairs import build_pairs
    from .data.records import BadRecords
    bad = BadRecords()
    n = build_pairs(a.curated, a.samples, a.out, bad=bad)
    print(json.dumps({"pairs": n, "skipped": bad.count, "skipped_reasons": bad.reasons[:10]}, indent=2))


def _tiny_spec(text: str):
    """``--spec`` JSON as a ``TinySpec``; a bad document or key is a ``ConfigError`` naming it."""
    from dataclasses import fields

    from .models.tiny import TinySpec
    try:
        values = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--spec: not valid JSON ({e.msg})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--spec: expected a JSON object of TinySpec fields, got {type(values).__name__}")
    known = [f.name for f in fields(TinySpec)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"--spec: unknown TinySpec field {', '.join(unknown)} (fields: {', '.join(known)})")
    return TinySpec(**values)


def cmd_model_tiny(a) -> None:
    from .models.tiny import build_tiny, corpus_from_data
    spec = _tiny_spec(a.spec)
    out = build_tiny(a.out, corpus_from_data(a.data), spec)
    print(f"tiny model saved to {out}")


def _report_training(folder: Path, finished: str) -> None:
    """Print the one line a training command ends with: the final folder, or the checkpoint
    it stopped at (``--halt-at-step``, SIGTERM, SIGINT) and how to continue."""
    from .trainers.interrupt import last_stop
    from .trainers.run import outcome
    print(outcome(folder, finished, stopped_by=last_stop()))


def cmd_sft(a) -> None:
    from .trainers.sft import train_sft
    cfg = load_config(SFTConfig, a.config, a.overrides)
    _report_training(train_sft(cfg, resume=_resume(a), halt_at_step=a.halt_at_step), "final model")


def cmd_serve(a) -> None:
    from .jobs.serve import API_KEY_ENV, run_server
    logging.getLogger().setLevel(a.log_level.upper())
    run_server(a.model, a.host, a.port, a.api_key or os.environ.get(API_KEY_ENV) or None, model_name=a.model_name,
               max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, max_tokens_limit=a.max_tokens_limit,
               max_context=a.max_context, dtype=a.dtype, threads=a.threads, log_level=a.log_level,
               file_url_dir=a.allow_file_urls, max_body_bytes=a.max_body_bytes, max_image_pixels=a.max_image_pixels,
               max_queue=a.max_queue)


def cmd_eval(a) -> None:
    from .eval.command import eval_command
    eval_command(a)


def cmd_rl(a) -> None:
    from .config import ALGO_PRESETS, RLConfig
    from .trainers.rl import train_rl
    cfg = load_config(RLConfig, a.config, a.overrides, defaults=ALGO_PRESETS[a.algo])
    _report_training(train_rl(cfg, resume=_resume(a), halt_at_step=a.halt_at_step), "final policy")


def cmd_disc_init(a) -> None:
    from .models.discriminator import init_discriminator
    if not Path(a.from_dir).is_dir():
        raise FileNotFoundError(f"--from {a.from_dir}: not a folder (a local Hugging Face checkpoint, e.g. the SFT "
                                "run's final/)")
    if a.top_k > a.experts:
        raise ConfigError(f"--top-k {a.top_k} is more than --experts {a.experts}")
    out = init_discriminator(a.from_dir, a.out, experts=a.experts, top_k=a.top_k, dense=a.dense,
                             text_only=a.text_only, noise_std=a.noise_std, routing=a.routing, seed=a.seed)
    print(f"discriminator saved to {out}")


def cmd_disc_pairs(a) -> None:
    from .trainers.warmup import sample_pairs
    max_new_tokens = a.max_new_tokens if a.max_new_tokens is not None else rl_response_limit(a.rl_config)
    print(json.dumps(sample_pairs(a.policy, a.data, a.out, n=a.n, max_new_tokens=max_new_tokens,
                                  limit=a.limit, seed=a.seed, batch_prompts=a.batch_prompts), indent=2))


def cmd_disc_warmup(a) -> None:
    from .config import WarmupConfig
    from .trainers.warmup import train_warmup
    cfg = load_config(WarmupConfig, a.config, a.overrides)
    _report_training(train_warmup(cfg, resume=_resume(a), halt_at_step=a.halt_at_step), "warmed-up discriminator")


def cmd_align(a) -> None:
    from .config import AlignConfig
    from .trainers.align import train_align
    cfg = load_config(AlignConfig, a.config, a.overrides)
    _report_training(train_align(cfg, resume=_resume(a), halt_at_step=a.halt_at_step), "aligned policy")


def cmd_plot(a) -> None:
    from .plots import plot_run
    for path in plot_run(a.run_dir):
        print(path)


def cmd_reward(a) -> None:
    from .reward import score_jsonl
    from .reward.plugins import load_reward_option
    fn = load_reward_option(a.reward_fn or "", "--reward-fn")
    stats = score_jsonl(a.input, a.output, reward_fn=fn)
    print(json.dumps(stats), file=sys.stderr)


def cmd_quickstart(a) -> None:
    from .quickstart import run_quickstart
    run_quickstart(a.out, seed=a.seed, overrides=a.overrides, fresh=a.fresh)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: env PRISM_THREADS, else torch's choice). "
                             "Tiny models run fastest with 1 thread per process.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the procedural visual-reasoning dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=POSITIVE, default=2000, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=_number(int, 24), default=96)
    p.add_argument("--public-error-rate", type=FRACTION, default=0.15)
    p.add_argument("--test-frac", type=FRACTION, default=0.15, help="share of problems held out (test.parquet)")
    p.add_argument("--align-frac", type=FRACTION, default=0.15, help="share of problems in the alignment pool")
    p.add_argument("--teacher-frac", type=FRACTION, default=0.1,
                   help="share of SFT-pool problems that also get the teacher's demonstration")
    p.add_argument("--public-style", choices=["varied", "teacher"], default="varied",
                   help="public demonstrations in other templates (varied) or in the teacher's (teacher: "
                        "they differ from the teacher's only by their slips)")
    p.add_argument("--families", default="", help="comma-separated subset of task families")
    p.set_defaults(fn=cmd_data_synth)
    p = data.add_parser("show", help="print a file's layout and first records, turn by turn; save a PNG contact sheet",
                        description="Detects the layout (verl parquet, ShareGPT JSON/JSONL, warm-up pairs, or a "
                        "benchmark release such as MathVista's parquet) and prints every turn of the first K records.")
    p.add_argument("file")
    p.add_argument("--out", default="", help="contact sheet PNG (default: FILE_sheet.png beside the file)")
    p.add_argument("-k", type=POSITIVE, default=8, help="records to show")
    p.set_defaults(fn=cmd_data_show)
    p = data.add_parser("convert", help="rewrite a data file in another layout, optionally asking for the PRISM format",
                        description="Reads any layout prism reads and writes the one --out's suffix names (.parquet: "
                        "verl; .json/.jsonl: ShareGPT, SFT data with responses only). --prism-format replaces each "
                        "prompt's system turn with the PRISM system prompt and removes the dataset's own format "
                        "instruction (the sentences naming <think>, <answer>, \\boxed, ..., and the lead-ins of "
                        "verl/EasyR1 templates); a prompt where that cannot be done is named, and nothing is written.")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--prism-format", action="store_true", help="make every prompt ask for <caption>/<think>/<answer>")
    p.set_defaults(fn=cmd_data_convert)

    p = data.add_parser("filter-difficulty", help="keep problems with pass rate in [low, high]")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output parquet (histogram PNG and stats beside it)")
    p.add_argument("--n", type=POSITIVE, default=16)
    p.add_argument("--low", type=FRACTION, default=0.2)
    p.add_argument("--high", type=FRACTION, default=0.8)
    _add_response_limit_args(p)
    p.add_argument("--batch-prompts", type=POSITIVE, default=16, help="prompts per generate call (x n sequences)")
    p.add_argument("--limit", type=POSITIVE, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="", help="reward whose accuracy is the pass rate: prism (default), boxed "
                   "(<think> + \\boxed{} answers) or path/to/file.py:function")
    p.add_argument("--no-prompt-check", action="store_true",
                   help="filter even when the prompts ask for another format than the reward scores")
    p.set_defaults(fn=cmd_data_filter)

    p = data.add_parser("curate", help="teacher demonstrations through an OpenAI-compatible endpoint")
    p.add_argument("--problems", required=True, help="problem file (verl parquet or JSONL)")
    p.add_argument("--out", required=True, help="output folder (rerun the same to resume)")
    p.add_argument("--teacher-url", required=True)
    p.add_argument("--teacher-model", required=True)
    p.add_argument("--teacher-key-env", default=None, help="env var holding the teacher key")
    p.add_argument("--judge-url", default=None)
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-key-env", default=None, help="env var holding the judge key")
    p.add_argument("--disambiguate", action="store_true", help="split multi-question images first")
    p.add_argument("--max-attempts", type=POSITIVE, default=3)
    p.add_argument("--concurrency", type=POSITIVE, default=8)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--max-retries", type=NON_NEGATIVE, default=5)
    p.add_argument("--backoff-base", type=float, default=0.5)
    p.add_argument("--max-tokens", type=POSITIVE, default=2048)
    p.add_argument("--alignment-share", type=FRACTION, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_data_curate)
    p = data.add_parser("build-pairs", help="curated demonstrations + policy samples -> warm-up pairs JSONL")
    p.add_argument("--curated", required=True, help="parquet with teacher_caption/teacher_cot")
    p.add_argument("--samples", required=True, help="JSONL with id and response (e.g. prism eval samples)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_data_build_pairs)

    model = sub.add_parser("model", help="models").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("tiny", help="build the embedded tiny Qwen3-VL")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="", help="data folder or file whose texts train the tokenizer")
    p.add_argument("--spec", default="", help='JSON overrides of TinySpec, e.g. \'{"hidden_size": 192}\'')
    p.set_defaults(fn=cmd_model_tiny)

    p = sub.add_parser("sft", help="stage 1: supervised fine-tuning")
    _add_config_args(p)
    _add_resume_args(p)
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("rl", help="stage 3: RL with verifiable rewards (GRPO, DAPO, GSPO)")
    p.add_argument("--algo", choices=["grpo", "dapo", "gspo"], default="grpo",
                   help="preset of METHOD.md section 7, applied before --config and overrides")
    _add_config_args(p)
    _add_resume_args(p)
    p.set_defaults(fn=cmd_rl)

    disc = sub.add_parser("disc", help="the MoE discriminator").add_subparsers(dest="disc_command", required=True)
    p = disc.add_parser("init", help="upcycle a dense checkpoint into an MoE discriminator")
    p.add_argument("--from", dest="from_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=POSITIVE, default=4)
    p.add_argument("--top-k", type=POSITIVE, default=2)
    p.add_argument("--dense", action="store_true", help="ablation: no upcycling")
    p.add_argument("--text-only", action="store_true", help="ablation: never sees the image")
    p.add_argument("--noise-std", type=float, default=0.01)
    p.add_argument("--routing", choices=["learned", "segment"], default="learned")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_disc_init)
    p = disc.add_parser("pairs", help="sample the SFT policy and pair its segments with the teacher's")
    p.add_argument("--policy", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=POSITIVE, default=1)
    _add_response_limit_args(p)
    p.add_argument("--limit", type=POSITIVE, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=POSITIVE, default=32, help="prompts per generate call (x n samples)")
    p.set_defaults(fn=cmd_disc_pairs)
    p = disc.add_parser("warmup", help="Bradley-Terry warm-up on teacher/student pairs")
    _add_config_args(p)
    _add_resume_args(p)
    p.set_defaults(fn=cmd_disc_warmup)

    p = sub.add_parser("align", help="stage 2: adversarial alignment against the discriminator")
    _add_config_args(p)
    _add_resume_args(p)
    p.set_defaults(fn=cmd_align)

    p = sub.add_parser("plot", help="draw a run's training curves as PNGs")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a held-out file or a benchmark; compare runs")
    _add_config_args(p)
    p.add_argument("--model", default="", help="checkpoint folder (model.path)")
    p.add_argument("--data", default="", help="held-out file, or with --benchmark its file or folder (data.eval)")
    p.add_argument("--benchmark", default="", help="MathVista, MathVerse, MathVision, WeMath, MMMU, "
                   "MMMU-Pro or HallusionBench (their release layouts; settings of METHOD.md section 8)")
    p.add_argument("--out", default="", help="root of every evaluation run (output_dir, default runs/eval): "
                   "results in OUT/NAME/<benchmark or heldout-FILE>/, the comparison table in OUT/results.md")
    p.add_argument("--name", default="", help="run name (name); default derived from the model path, "
                   "e.g. runs/rl/final -> rl-final")
    p.add_argument("--fresh", action="store_true", help="start this run's benchmark (or held-out file) over; "
                   "without it a rerun resumes")
    p.add_argument("--report", action="store_true", help="only rebuild and print the comparison table of --out")
    p.add_argument("--judge-url", default="", help="with --benchmark: OpenAI-compatible judge endpoint")
    p.add_argument("--judge-model", default="")
    p.add_argument("--limit", type=int, default=None, help="first N problems (data.limit)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation cap (generation.max_new_tokens); with --benchmark default the benchmark's")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server for a checkpoint")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env PRISM_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint folder's "
                   "name, with its run folder's name before a stage output's: runs/rl/final is served as rl/final)")
    p.add_argument("--max-batch", type=POSITIVE, default=32, help="requests batched into one generate call")
    p.add_argument("--batch-wait-ms", type=_number(float, 0.0), default=10, help="how long a batch waits to fill")
    p.add_argument("--max-tokens-limit", type=POSITIVE, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-context", type=POSITIVE, default=None, help="prompt + completion token limit")
    p.add_argument("--allow-file-urls", metavar="DIR", default=None,
                   help="read file:// image URLs, only for regular files inside DIR (symbolic links resolved); "
                   "default: file URLs are refused")
    p.add_argument("--max-body-bytes", type=POSITIVE, default=8 * 2**20,
                   help="largest request body; a larger one is refused unread with a 413 (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=4096 * 4096,
                   help="most pixels (width x height, summed over its images) one request may send, checked "
                   "before decoding; more is a 400 (default 16,777,216 = 4096 x 4096)")
    p.add_argument("--max-queue", type=POSITIVE, default=256,
                   help="most requests in flight (encoding, waiting or generating); one more gets a 429 "
                   "(default 256)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("reward", help="score responses in a JSONL file with the verifiable reward",
                       epilog=REWARD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL with response and ground_truth per line (below)")
    p.add_argument("--output", default=None, help="scored JSONL (default: stdout)")
    p.add_argument("--reward-fn", default=None, help="prism (default), boxed, or a custom reward as "
                   "path/to/file.py:function")
    p.set_defaults(fn=cmd_reward)

    p = sub.add_parser("quickstart", help="the whole recipe on the embedded default (CPU)")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the quick start's settings")
    p.set_defaults(fn=cmd_quickstart)
    return parser


def _command(args) -> str:
    """The command as typed: ``rl``, ``data show``, ``disc pairs``..."""
    sub = next((getattr(args, k) for k in ("data_command", "model_command", "disc_command") if getattr(args, k, None)),
               None)
    return f"{args.command} {sub}" if sub else args.command


def _message(e: Exception) -> str:
    """The error's text; an OS error that names a file as ``FILE: reason``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror.lower()}"
    return str(e)


def _end_torchrun_worker(code: int) -> None:
    """Under torchrun, end the process here with ``code`` (``distributed.finish``: a barrier
    after success, then ``os._exit``, skipping the interpreter teardown in which finished ranks
    aborted now and then). Nothing to do in one process, or when the command never imported
    torch.distributed."""
    if "prism_rl.distributed" in sys.modules:
        sys.modules["prism_rl.distributed"].finish(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    _end_torchrun_worker(code)
    return code


def _run(args) -> int:
    """Run the parsed command; its exit code, an error printed as one line."""
    threads = args.threads or int(os.environ.get("PRISM_THREADS", "0") or 0)
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        print(f"prism {_command(args)}: error: {_message(e)}", file=sys.stderr)
        return 2
    # training diverged (NaN/inf weights or loss streak), or math-verify is missing: say so, exit 1
    except (FloatingPointError, MathVerifyUnavailable) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"prism {_command(args)}: error: {e}", file=sys.stderr)
        return 1
    except Abort as e:          # a second SIGTERM/SIGINT during training: out at once
        print(f"prism {_command(args)}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:   # Ctrl-C outside a training loop (loading, evaluating, ...)
        if args.verbose:
            traceback.print_exc()
        print(f"prism {_command(args)}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
