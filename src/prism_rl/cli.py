"""``prism <command>``: thin wrappers that parse a config and call one stage.

Training and evaluation commands take ``--config FILE.yaml`` plus dotted overrides
(``train.lr=2e-4 data.skip_bad=true``); bad keys or values exit with a message naming them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, EvalConfig, SFTConfig, load_config
from .data.records import DataError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")


def _add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--halt-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")


def cmd_data_synth(a) -> None:
    from .data.synth import synthesize
    kwargs = {"image_size": a.image_size, "public_error_rate": a.public_error_rate}
    if a.families:
        kwargs["families"] = a.families.split(",")
    stats = synthesize(a.out, a.n, a.seed, **kwargs)
    print(json.dumps(stats, indent=2))


def cmd_data_show(a) -> None:
    from .data.synth import show
    out = a.out or str(Path(a.file).with_suffix("")) + "_sheet.png"
    show(a.file, out, k=a.k)
    print(f"contact sheet: {out}")


def cmd_data_filter(a) -> None:
    from .jobs.difficulty import filter_difficulty
    stats = filter_difficulty(a.model, a.data, a.out, n=a.n, low=a.low, high=a.high,
                              max_new_tokens=a.max_new_tokens, limit=a.limit, seed=a.seed)
    print(json.dumps(stats, indent=2))


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


def cmd_model_tiny(a) -> None:
    from .models.tiny import TinySpec, build_tiny, corpus_from_data
    spec = TinySpec(**json.loads(a.spec)) if a.spec else TinySpec()
    out = build_tiny(a.out, corpus_from_data(a.data), spec)
    print(f"tiny model saved to {out}")


def cmd_sft(a) -> None:
    from .trainers.sft import train_sft
    cfg = load_config(SFTConfig, a.config, a.overrides)
    print(f"final model: {train_sft(cfg, resume=a.resume, halt_at_step=a.halt_at_step)}")


def cmd_serve(a) -> None:
    from .jobs.serve import API_KEY_ENV, run_server
    logging.getLogger().setLevel(a.log_level.upper())
    run_server(a.model, a.host, a.port, a.api_key or os.environ.get(API_KEY_ENV) or None, model_name=a.model_name,
               max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, max_tokens_limit=a.max_tokens_limit,
               max_context=a.max_context, dtype=a.dtype, threads=a.threads, log_level=a.log_level)


def cmd_eval(a) -> None:
    if a.benchmark:
        from .eval.run_benchmark import run_eval
        kwargs = {k: v for k, v in (("limit", a.limit), ("max_new_tokens", a.max_new_tokens)) if v is not None}
        run_eval(a.benchmark, a.data, a.model, out_dir=a.out or None, judge_url=a.judge_url or None,
                 judge_model=a.judge_model or None, **kwargs)
        return
    from .eval.evaluate import evaluate, format_table
    overrides = list(a.overrides)
    if a.model:
        overrides.append(f"model.path={a.model}")
    if a.data:
        overrides.append(f"data.eval={a.data}")
    cfg = load_config(EvalConfig, a.config, overrides)
    summary = evaluate(cfg)
    print(format_table([summary]))
    print(f"summary: {Path(cfg.output_dir) / 'summary.json'}")


def cmd_rl(a) -> None:
    from .config import ALGO_PRESETS, RLConfig
    from .trainers.rl import train_rl
    cfg = load_config(RLConfig, a.config, a.overrides, defaults=ALGO_PRESETS[a.algo])
    print(f"final policy: {train_rl(cfg, resume=a.resume, halt_at_step=a.halt_at_step)}")


def cmd_disc_init(a) -> None:
    from .models.discriminator import init_discriminator
    out = init_discriminator(a.from_dir, a.out, experts=a.experts, top_k=a.top_k, dense=a.dense,
                             text_only=a.text_only, noise_std=a.noise_std, routing=a.routing, seed=a.seed)
    print(f"discriminator saved to {out}")


def cmd_disc_pairs(a) -> None:
    from .trainers.warmup import sample_pairs
    print(json.dumps(sample_pairs(a.policy, a.data, a.out, n=a.n, max_new_tokens=a.max_new_tokens,
                                  limit=a.limit, seed=a.seed), indent=2))


def cmd_disc_warmup(a) -> None:
    from .config import WarmupConfig
    from .trainers.warmup import train_warmup
    cfg = load_config(WarmupConfig, a.config, a.overrides)
    print(f"warmed-up discriminator: {train_warmup(cfg, resume=a.resume, halt_at_step=a.halt_at_step)}")


def cmd_align(a) -> None:
    from .config import AlignConfig
    from .trainers.align import train_align
    cfg = load_config(AlignConfig, a.config, a.overrides)
    print(f"aligned policy: {train_align(cfg, resume=a.resume, halt_at_step=a.halt_at_step)}")


def cmd_plot(a) -> None:
    from .plots import plot_run
    for path in plot_run(a.run_dir):
        print(path)


def cmd_reward(a) -> None:
    from .reward import load_reward_fn, score_jsonl
    fn = load_reward_fn(a.reward_fn) if a.reward_fn else None
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
    p.add_argument("--n", type=int, default=2000, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--public-error-rate", type=float, default=0.15)
    p.add_argument("--families", default="", help="comma-separated subset of task families")
    p.set_defaults(fn=cmd_data_synth)
    p = data.add_parser("show", help="print records and save a PNG contact sheet")
    p.add_argument("file")
    p.add_argument("--out", default="")
    p.add_argument("-k", type=int, default=8)
    p.set_defaults(fn=cmd_data_show)

    p = data.add_parser("filter-difficulty", help="keep problems with pass rate in [low, high]")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output parquet (histogram PNG and stats beside it)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--low", type=float, default=0.2)
    p.add_argument("--high", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--backoff-base", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--alignment-share", type=float, default=0.05)
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
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
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
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser("eval", help="evaluate a checkpoint on a held-out file")
    _add_config_args(p)
    p.add_argument("--model", default="")
    p.add_argument("--data", default="")
    p.add_argument("--benchmark", default="", help="MathVista, MathVerse, MathVision, WeMath, MMMU, "
                   "MMMU-Pro or HallusionBench (their release layouts; settings of METHOD.md section 8)")
    p.add_argument("--out", default="", help="with --benchmark: output folder")
    p.add_argument("--judge-url", default="", help="with --benchmark: OpenAI-compatible judge endpoint")
    p.add_argument("--judge-model", default="")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server for a checkpoint")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env PRISM_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests batched into one generate call")
    p.add_argument("--batch-wait-ms", type=float, default=10, help="how long a batch waits to fill")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-context", type=int, default=None, help="prompt + completion token limit")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("reward", help="score responses in a JSONL file with the verifiable reward")
    p.add_argument("--input", required=True)
    p.add_argument("--output", default=None)
    p.add_argument("--reward-fn", default=None, help="custom reward as path/to/file.py:function")
    p.set_defaults(fn=cmd_reward)

    p = sub.add_parser("quickstart", help="the whole recipe on the embedded default (CPU)")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the quick start's settings")
    p.set_defaults(fn=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or int(os.environ.get("PRISM_THREADS", "0") or 0)
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"prism {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
