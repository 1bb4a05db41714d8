"""What ``prism eval`` runs: one config for the held-out and the benchmark paths, every flag
and dotted override honoured or refused with a message, the settings in force printed first,
the comparison table of all runs printed last.

Both paths read :class:`prism_rl.config.EvalConfig` (``--config`` + dotted overrides, unknown
keys refused as in every stage); the flags are applied on top and win:

=====================  ==============================  =======================================
flag                   config key                      notes
=====================  ==============================  =======================================
``--model``            ``model.path``
``--data``             ``data.eval``                   a held-out file, or the benchmark's data
``--limit``            ``data.limit``
``--max-new-tokens``   ``generation.max_new_tokens``   benchmarks: default is the benchmark's
``--out``              ``output_dir``                  the root of every run (runs/eval)
``--name``             ``name``                        default derived from the model's path
=====================  ==============================  =======================================

With ``--benchmark`` the sampling settings not set by the user come from the benchmark table
(``prism_rl.eval.benchmark_table``, METHOD.md section 8), ``data.max_prompt_length`` defaults to
32768, and ``generation.n`` must stay 1. ``--judge-url``/``--judge-model`` exist only there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from .. import distributed as D
from ..config import ConfigError, EvalConfig, load_config
from ..data.images import configure_images

__all__ = ["eval_command", "eval_config"]

FLAG_KEYS = {"model": "model.path", "data": "data.eval", "limit": "data.limit",
             "max_new_tokens": "generation.max_new_tokens", "out": "output_dir", "name": "name"}
BENCHMARK_PROMPT_LENGTH = 32768
_TRAINING_ONLY = ("freeze_vision", "gradient_checkpointing")


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def _assign(cfg: EvalConfig, key: str, value, flag: str) -> None:
    *sections, field = key.split(".")
    node = cfg
    for s in sections:
        node = getattr(node, s)
    try:
        setattr(node, field, value)
    except ValidationError as e:
        raise ConfigError(f"{flag}: {e.errors()[0]['msg']} (got {value!r})") from None


def eval_config(a) -> EvalConfig:
    """``--config`` + overrides, then the flags, checked: what both paths run with."""
    cfg = load_config(EvalConfig, a.config, a.overrides)
    for attr, key in FLAG_KEYS.items():
        value = getattr(a, attr, None)
        if value not in (None, ""):
            _assign(cfg, key, value, _flag(attr))
    for k in _TRAINING_ONLY:
        if getattr(cfg.model, k):
            raise ConfigError(f"model.{k}: a training setting; prism eval does not read it")
    if not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path (--model) '{cfg.model.path}': not a folder (a local Hugging Face checkpoint)")
    if not cfg.data.eval:
        raise ConfigError("data.eval (--data): no data given (a held-out file, or with --benchmark the "
                          "benchmark's file or downloaded folder)")
    if not Path(cfg.data.eval).exists():
        raise ConfigError(f"data.eval (--data) '{cfg.data.eval}': no such file or folder")
    return cfg


def _source(cfg: EvalConfig, a, key: str, unset: str) -> str:
    """Where a generation setting came from: its flag, the config/overrides, or ``unset``."""
    if key == "max_new_tokens" and a.max_new_tokens is not None:
        return "--max-new-tokens"
    return "config" if key in cfg.generation.model_fields_set else unset


def _settings_line(params, sources: dict[str, str]) -> str:
    return ", ".join(f"{k} {getattr(params, k)} ({sources[k]})" for k in ("max_new_tokens", "temperature", "top_p"))


def _where_line(info: dict, model: str) -> str:
    resumed = f"; {info['done']} of {info['n_records']} already done, resuming" if info["done"] else ""
    return f"run {info['run']} (model {model}) -> {info['out']}/{resumed}"


def _report(root: str, print_fn: Callable[[str], None]) -> None:
    from .report import collect_results, results_markdown, write_report

    files = write_report(root)
    print_fn(f"prism eval: comparison table of every run under {root}: {files['md']} (also .csv, .png, .json)")
    print_fn(results_markdown(collect_results(root)))


def _run_heldout(a, cfg: EvalConfig, print_fn: Callable[[str], None]) -> None:
    from .evaluate import evaluate, format_table
    from .layout import model_id

    for attr in ("judge_url", "judge_model"):
        if getattr(a, attr):
            raise ConfigError(f"{_flag(attr)}: applies to --benchmark only (held-out answers are checked "
                              f"by the verifiable reward's rules)")
    sources = {k: _source(cfg, a, k, "default") for k in ("max_new_tokens", "temperature", "top_p")}

    def announce(info: dict) -> None:
        print_fn(f"prism eval: held-out {info['data']}, {info['n_records']} problems, n {info['params'].n}, "
                 + _settings_line(info["params"], sources))
        print_fn("prism eval: " + _where_line(info, model_id(cfg.model.path)))

    summary = evaluate(cfg, fresh=a.fresh, announce=announce, report=False)
    print_fn(format_table([summary]))
    if D.is_main():   # torchrun: rank 0 rebuilds the table
        _report(cfg.output_dir, print_fn)


def _judge(a):
    from .judge import Judge

    if bool(a.judge_url) != bool(a.judge_model):
        raise ConfigError("--judge-url and --judge-model go together")
    return Judge(a.judge_url, a.judge_model, api_key_env="PRISM_JUDGE_API_KEY", timeout=60.0) if a.judge_url else None


def _run_benchmark(a, cfg: EvalConfig, print_fn: Callable[[str], None]) -> None:
    from .benchmark_table import get_benchmark
    from .layout import claim_run, model_id
    from .report import summary_line
    from .run_benchmark import evaluate_benchmark

    spec = get_benchmark(a.benchmark)
    g, d = cfg.generation, cfg.data
    if g.n != 1:
        raise ConfigError(f"generation.n={g.n}: a benchmark is evaluated with one response per problem; leave it at 1")
    judge = _judge(a)
    sources = {k: _source(cfg, a, k, "benchmark default") for k in ("max_new_tokens", "temperature", "top_p")}
    explicit = {k: getattr(g, k) if sources[k] != "benchmark default" else None
                for k in ("max_new_tokens", "temperature", "top_p")}
    run, run_dir = claim_run(cfg.output_dir, cfg.name or None, cfg.model.path)

    def announce(info: dict) -> None:
        print_fn(f"prism eval: {info['benchmark']} {info['split']}, {info['n_records']} problems, "
                 + _settings_line(info["params"], sources))
        print_fn("prism eval: " + _where_line(info, model_id(cfg.model.path)))

    configure_images(d)
    s = evaluate_benchmark(
        spec.name, d.eval, cfg.model.path, run_dir, judge=judge, batch_size=g.batch_size, limit=d.limit,
        fresh=a.fresh, seed=g.seed, skip_bad=d.skip_bad,
        max_prompt_length=d.max_prompt_length if "max_prompt_length" in d.model_fields_set else BENCHMARK_PROMPT_LENGTH,
        max_pixels=d.max_pixels, min_pixels=d.min_pixels, model_cfg=cfg.model, report=False,
        announce=announce, **explicit)
    print_fn(summary_line(s))
    _report(cfg.output_dir, print_fn)


_REPORT_ONLY_IGNORED = ("config", "overrides", "model", "data", "benchmark", "limit", "max_new_tokens", "name",
                        "fresh", "judge_url", "judge_model")


def eval_command(a, print_fn: Callable[[str], None] = print) -> None:
    """``prism eval``: ``--report`` rebuilds the table; ``--benchmark`` evaluates a benchmark;
    otherwise a held-out file."""
    if a.report:
        given = [_flag(k) if k != "overrides" else "dotted overrides" for k in _REPORT_ONLY_IGNORED if getattr(a, k)]
        if given:
            raise ConfigError(f"--report rebuilds the comparison table only and takes only --out, not {', '.join(given)}")
        root = a.out or EvalConfig().output_dir
        if not Path(root).is_dir():
            raise ConfigError(f"--out '{root}': no such folder (no evaluation has written there yet)")
        _report(root, print_fn)
        return
    cfg = eval_config(a)
    if D.launched():   # torchrun: held-out files only; each rank generates a share, rank 0 writes and prints
        if a.benchmark:
            raise ConfigError("--benchmark does not run under torchrun yet (held-out files do): run it as one process")
        D.init_from_env()
        print_fn = print_fn if D.is_main() else _silent
    (_run_benchmark if a.benchmark else _run_heldout)(a, cfg, print_fn)


def _silent(line: str) -> None:
    """The printer of ranks other than 0 under torchrun."""
