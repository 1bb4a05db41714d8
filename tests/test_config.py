"""Config loading: YAML + dotted overrides; unknown keys and bad values name the key."""

import pytest

from prism_rl.cli import main
from prism_rl.config import ConfigError, SFTConfig, load_config, parse_overrides, save_config

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


def test_cli_rejects_bad_override_naming_key(tmp_path, capsys):
    args = ["sft", "--config", str(CONFIGS / "quickstart" / "sft.yaml"), f"output_dir={tmp_path / 'bad'}",
            "optim.lrr=1"]
    assert main(args) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
