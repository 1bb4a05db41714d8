"""Config loading: YAML + dotted overrides; unknown keys and bad values name the key."""

import pytest

from prism_rl.cli import main
from prism_rl.config import (
    ALGO_PRESETS,
    AlignConfig,
    ConfigError,
    EvalConfig,
    RLConfig,
    SFTConfig,
    WarmupConfig,
    load_config,
    parse_overrides,
    rl_response_limit,
    save_config,
)

from conftest import CONFIGS


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["optim.lr=2e-4", "data.skip_bad=true", "train.batch_size=4", "output_dir=x"]) == {
        "optim": {"lr": 2e-4}, "data": {"skip_bad": True}, "train": {"batch_size": 4}, "output_dir": "x"}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  batch_size: 16\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=2e-4"])
    assert cfg.optim.lr == 2e-4 and cfg.train.batch_size == 16 and cfg.optim.schedule == "cosine"


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.x=1", "unknown config key 'nosuch'"),
    ("train.batch_size=0", "bad value for 'train.batch_size'"),
    ("optim.schedule=exp", "bad value for 'optim.schedule'"),
    ("data.skip_bad=maybe", "bad value for 'data.skip_bad'"),
    ("optim.lr", "not of the form key.sub=value"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, f)
    msg = str(e.value)
    assert str(f) in msg and "optim.learning_rate" in msg and "lr" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "none.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, f)


def test_save_roundtrip(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=3e-4", "model.freeze_vision=true"])
    path = save_config(cfg, tmp_path)
    assert load_config(SFTConfig, path) == cfg


# ---------------------------------------------------------------------- sections and combinations


def test_alignment_rejects_rl_only_keys():
    """The alignment stage has its own PPO section: RL's KL, dynamic sampling, overlong shaping
    and algorithm name would be accepted and ignored there, so they are unknown keys."""
    for key in ("ppo.kl_coef=0.1", "ppo.dynamic_sampling=true", "ppo.overlong_buffer=8", "ppo.name=dapo",
                "algo.clip_low=0.2", "train.eval_every=5", "data.eval=x.parquet", "data.max_length=99"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(AlignConfig, None, [key])
    cfg = load_config(AlignConfig, None, ["ppo.clip_high=0.28", "ppo.micro_batch_size=4"])
    assert cfg.ppo.clip_high == 0.28 and cfg.ppo.micro_batch_size == 4


def test_stage_sections_hold_only_what_the_stage_reads():
    with pytest.raises(ConfigError, match="unknown config key 'data.max_prompt_length'"):
        load_config(SFTConfig, None, ["data.max_prompt_length=10"])
    with pytest.raises(ConfigError, match="unknown config key 'data.max_length'"):
        load_config(RLConfig, None, ["data.max_length=10"])
    with pytest.raises(ConfigError, match="unknown config key 'data.train'"):
        load_config(EvalConfig, None, ["data.train=x"])
    assert load_config(WarmupConfig, None, ["train.save_every=5"]).train.save_every == 5


@pytest.mark.parametrize("cls,overrides,needle", [
    (RLConfig, ["algo.ratio_level=sequence", "algo.agg=token-mean"], "ratio_level 'sequence' (GSPO) needs agg"),
    (AlignConfig, ["ppo.ratio_level=sequence"], "needs agg 'seq-mean-token-mean'"),
    (RLConfig, ["rollout.n=1"], "rollout.n=1: group-normalised advantages need at least 2"),
    (AlignConfig, ["rollout.n=1"], "rollout.n=1"),
    (RLConfig, ["rollout.n=2", "rollout.prompts_per_step=2", "algo.mini_batches=5"], "mini_batches=5 is more than the 4"),
    (RLConfig, ["rollout.max_new_tokens=100", "algo.overlong_buffer=100"], "overlong_buffer (100) must be below"),
    (RLConfig, ["rollout.gen_batch_prompts=96"], "only applies with algo.dynamic_sampling"),
    (SFTConfig, ["data.min_pixels=1000", "data.max_pixels=10"], "data.min_pixels (1000) is above data.max_pixels (10)"),
])
def test_combinations_are_checked(cls, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, overrides)
    assert needle in str(e.value)


def test_presets_pass_the_combination_checks():
    for name, preset in ALGO_PRESETS.items():
        cfg = load_config(RLConfig, None, [], defaults=preset)
        assert cfg.algo.name == name
    gspo = load_config(RLConfig, None, [], defaults=ALGO_PRESETS["gspo"])
    assert (gspo.algo.ratio_level, gspo.algo.agg) == ("sequence", "seq-mean-token-mean")


# METHOD.md section 7's table (the GRPO weight decay, which the spec leaves out, is the reference's 0.01).
SPEC_ROWS = {
    "grpo": {"clip_low": 0.2, "clip_high": 0.2, "clip_c": None, "agg": "token-mean", "ratio_level": "token",
             "kl_coef": 0.0, "dynamic_sampling": False, "overlong_buffer": 0,
             "lr": 1e-6, "schedule": "constant", "warmup": 0, "weight_decay": 0.01},
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 10.0, "agg": "token-mean", "ratio_level": "token",
             "kl_coef": 0.0, "dynamic_sampling": True, "overlong_buffer": 4096, "overlong_factor": 1.0,
             "gen_batch_prompts": 96, "max_num_gen_batches": 10,
             "lr": 1e-6, "schedule": "constant", "warmup": 10, "weight_decay": 0.1},
    "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "clip_c": None, "agg": "seq-mean-token-mean",
             "ratio_level": "sequence", "kl_coef": 0.0, "dynamic_sampling": False, "overlong_buffer": 0,
             "lr": 1e-6, "schedule": "constant", "warmup": 0.05, "weight_decay": 0.1},
}


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
def test_presets_are_the_spec_rows(name):
    cfg = load_config(RLConfig, None, [], defaults=ALGO_PRESETS[name])
    row = dict(SPEC_ROWS[name])
    warmup = row.pop("warmup")
    assert (cfg.optim.warmup_steps if isinstance(warmup, int) and warmup else cfg.optim.warmup_ratio) == warmup
    for key, want in row.items():
        section = cfg.optim if key in ("lr", "schedule", "weight_decay") else \
            cfg.rollout if key == "gen_batch_prompts" else cfg.algo
        assert getattr(section, key) == want, (name, key)
    # common to all three: 32 prompts x 16 rollouts, 2048 / 8192 tokens, temperature 1, grad clip 1, 1500 steps
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.data.max_prompt_length, cfg.rollout.max_new_tokens,
            cfg.rollout.temperature, cfg.optim.grad_clip, cfg.train.steps) == (32, 16, 2048, 8192, 1.0, 1.0, 1500)


def test_rl_default_is_the_grpo_row():
    plain, grpo = RLConfig(), load_config(RLConfig, None, [], defaults=ALGO_PRESETS["grpo"])
    assert plain.optim == grpo.optim and plain.algo == grpo.algo


def test_rl_response_limit_default_and_from_file(tmp_path):
    assert rl_response_limit() == RLConfig().rollout.max_new_tokens == 8192
    f = tmp_path / "rl.yaml"
    # only the rollout section is read: a DAPO-only key that needs the --algo preset does not trip it
    f.write_text("rollout:\n  max_new_tokens: 4096\n  gen_batch_prompts: 96\n")
    assert rl_response_limit(f) == 4096
    f.write_text("algo:\n  name: dapo\n")
    assert rl_response_limit(f) == 8192
    f.write_text("rollout:\n  max_new_tokens: -3\n")
    with pytest.raises(ConfigError, match=f"{f}, section 'rollout': bad value for 'max_new_tokens'"):
        rl_response_limit(f)
    with pytest.raises(ConfigError, match="config file not found"):
        rl_response_limit(tmp_path / "none.yaml")


def test_cli_rejects_bad_override_naming_key(tmp_path, capsys):
    args = ["sft", "--config", str(CONFIGS / "quickstart" / "sft.yaml"), f"output_dir={tmp_path / 'bad'}",
            "optim.lrr=1"]
    assert main(args) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
