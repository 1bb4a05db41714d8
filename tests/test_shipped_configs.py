"""Every YAML shipped under configs/ loads through the CLI's own loader, and the Qwen3-VL
configs hold the reference settings of docs/METHOD.md (sections 4-8)."""

from __future__ import annotations

import re

import pytest

from prism_rl.config import ALGO_PRESETS, AlignConfig, EvalConfig, RLConfig, SFTConfig, WarmupConfig, load_config

from conftest import CONFIGS

CLASSES = {"sft": SFTConfig, "warmup": WarmupConfig, "align": AlignConfig, "eval": EvalConfig}
QWEN_STAGES = ("sft", "warmup", "align", "rl_grpo", "rl_dapo", "rl_gspo", "eval")


def stage_of(path) -> tuple[type, str | None]:
    """(config class, algorithm preset) for a config file, from its name: ``rl_dapo.yaml`` is
    loaded like ``prism rl --algo dapo``; a plain ``rl.yaml`` like the default ``--algo grpo``."""
    stem = path.stem
    if stem == "rl" or stem.startswith("rl_"):
        return RLConfig, stem[3:] or "grpo"
    if stem not in CLASSES:
        raise AssertionError(f"{path}: no config class for this file name; add it to CLASSES")
    return CLASSES[stem], None


def load_shipped(path, preset: str | None = None):
    cls, algo = stage_of(path)
    algo = preset or algo
    return load_config(cls, path, defaults=ALGO_PRESETS[algo] if algo else None)


ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    cfg = load_shipped(path)
    assert cfg.output_dir.startswith("runs/")


def test_qwen3vl_configs_are_all_there():
    for size in ("4b", "8b"):
        names = sorted(p.stem for p in (CONFIGS / "qwen3vl" / size).glob("*.yaml"))
        assert names == sorted(QWEN_STAGES)
    assert len(ALL_YAMLS) >= 5 + 2 * len(QWEN_STAGES)


@pytest.mark.parametrize("algo", sorted(ALGO_PRESETS))
def test_quickstart_rl_loads_under_every_preset(algo):
    cfg = load_shipped(CONFIGS / "quickstart" / "rl.yaml", preset=algo)
    assert cfg.algo.name == algo and cfg.rollout.n == 8


# dotted key -> the reference value (METHOD.md sections 4-8), the same at 4B and 8B
SPEC = {
    "sft": {"optim.lr": 1e-5, "optim.schedule": "cosine", "optim.warmup_ratio": 0.1, "train.epochs": 1,
            "data.max_length": 8192, "optim.grad_clip": 1.0},
    "warmup": {"optim.lr": 1e-5, "optim.weight_decay": 0.01, "optim.schedule": "cosine", "optim.warmup_ratio": 0.1,
               "train.epochs": 1, "train.batch_size": 128, "train.aux_coef": 0.01, "data.max_pixels": 560 * 560},
    "align": {"rollout.n": 16, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 6144,
              "rollout.temperature": 1.0, "data.max_prompt_length": 2048, "optim.lr": 1e-6,
              "optim.weight_decay": 0.01, "optim.schedule": "constant", "optim.grad_clip": 1.0,
              "disc_optim.lr": 1e-6, "disc_optim.weight_decay": 0.01, "disc_optim.schedule": "constant",
              "disc_optim.grad_clip": 1.0, "ppo.clip_low": 0.2, "ppo.clip_high": 0.2, "ppo.agg": "token-mean",
              "ppo.ppo_epochs": 1, "ppo.entropy_coef": 0.0, "align.alpha": 0.5, "align.format_penalty": 1.5,
              "align.reg_coef": 0.001, "train.steps": 500},
    "rl": {"rollout.n": 16, "rollout.prompts_per_step": 32, "rollout.max_new_tokens": 8192,
           "rollout.temperature": 1.0, "data.max_prompt_length": 2048, "optim.lr": 1e-6, "optim.schedule": "constant",
           "optim.grad_clip": 1.0, "algo.kl_coef": 0.0, "algo.entropy_coef": 0.0, "algo.ppo_epochs": 1,
           "reward.acc_weight": 0.8, "reward.format_weight": 0.2, "train.steps": 1500},
    "rl_grpo": {"algo.name": "grpo", "algo.clip_low": 0.2, "algo.clip_high": 0.2, "algo.clip_c": None,
                "algo.agg": "token-mean", "algo.dynamic_sampling": False, "algo.overlong_buffer": 0,
                "optim.warmup_ratio": 0.0},
    "rl_dapo": {"algo.name": "dapo", "algo.clip_low": 0.2, "algo.clip_high": 0.28, "algo.clip_c": 10.0,
                "algo.agg": "token-mean", "algo.dynamic_sampling": True, "rollout.gen_batch_prompts": 96,
                "algo.max_num_gen_batches": 10, "algo.overlong_buffer": 4096, "algo.overlong_factor": 1.0,
                "optim.warmup_steps": 10, "optim.weight_decay": 0.1},
    "rl_gspo": {"algo.name": "gspo", "algo.clip_low": 3e-4, "algo.clip_high": 4e-4, "algo.ratio_level": "sequence",
                "algo.agg": "seq-mean-token-mean", "optim.warmup_ratio": 0.05, "optim.weight_decay": 0.1},
    "eval": {"generation.temperature": 1.0, "generation.top_p": 0.7, "generation.max_new_tokens": 8192,
             "generation.n": 1},
}


def get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("size", ["4b", "8b"])
@pytest.mark.parametrize("stage", QWEN_STAGES)
def test_qwen3vl_configs_hold_the_reference_settings(size, stage):
    cfg = load_shipped(CONFIGS / "qwen3vl" / size / f"{stage}.yaml")
    expected = SPEC[stage] | (SPEC["rl"] if stage.startswith("rl_") else {})
    wrong = {k: (get(cfg, k), v) for k, v in expected.items() if get(cfg, k) != v}
    assert not wrong, f"{size}/{stage}.yaml (got, reference): {wrong}"


def test_8b_align_is_the_reference_game():
    cfg = load_shipped(CONFIGS / "qwen3vl" / "8b" / "align.yaml")
    assert (cfg.rollout.n, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens) == (16, 4, 6144)
    assert cfg.model.path == "runs/qwen3vl-8b/sft/final" and cfg.disc.path == "runs/qwen3vl-8b/disc/warmup/final"


@pytest.mark.parametrize("stage", [s for s in QWEN_STAGES if s.startswith("rl_")])
def test_rl_configs_state_their_preset(stage):
    """Loaded over any --algo preset, an RL file gives the same config: it names every value
    of its own algorithm, so a mismatched --algo cannot silently change the run."""
    path = CONFIGS / "qwen3vl" / "4b" / f"{stage}.yaml"
    loaded = {algo: load_shipped(path, preset=algo) for algo in ALGO_PRESETS}
    assert all(cfg == loaded[stage[3:]] for cfg in loaded.values())
    assert loaded[stage[3:]] == load_config(RLConfig, path)


# keys whose values may differ between the 4B and 8B files: where the files live and memory knobs
SIZE_KEYS = {"model.path", "disc.path", "output_dir", "name", "train.batch_size", "train.grad_accum",
             "ppo.micro_batch_size", "algo.micro_batch_size", "disc.batch_size", "generation.batch_size"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


@pytest.mark.parametrize("stage", QWEN_STAGES)
def test_4b_and_8b_differ_only_in_paths_and_memory_knobs(stage):
    a, b = (_flat(load_shipped(CONFIGS / "qwen3vl" / s / f"{stage}.yaml").model_dump()) for s in ("4b", "8b"))
    differ = {k for k in a if a[k] != b[k]}
    assert differ <= SIZE_KEYS, differ - SIZE_KEYS
    if stage == "sft":
        assert a["train.batch_size"] * a["train.grad_accum"] == b["train.batch_size"] * b["train.grad_accum"] == 128
    for key in ("model.path", "disc.path", "output_dir"):
        if key in a:
            assert "4b" in a[key].lower() and "8b" in b[key].lower()


@pytest.mark.parametrize("path", sorted((CONFIGS / "qwen3vl").rglob("*.yaml")), ids=lambda p: p.stem)
def test_qwen3vl_headers_cite_method_md(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"docs/METHOD\.md section \d", header), path
    assert "Expects:" in header
