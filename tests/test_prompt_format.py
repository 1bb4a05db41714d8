"""Data from verl's examples can earn a reward: the built-in ``boxed`` reward, the check that a
prompt asks for the format its reward scores, and the rewrite to the PRISM format."""

from __future__ import annotations

import json
import logging
import re

import pytest

from prism_rl.cli import main
from prism_rl.config import AlignConfig, ConfigError, RLConfig
from prism_rl.data.layouts import read_records
from prism_rl.data.prompt_format import PromptFormatError, asked_conventions, check_prompts, to_prism_format
from prism_rl.data.records import BadField, Record
from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.jobs.difficulty import filter_difficulty
from prism_rl.reward import batch_scores, boxed_score, compute_score, load_reward_fn
from prism_rl.reward.boxed import boxed_format_ok, last_boxed
from prism_rl.reward.plugins import load_reward_option
from prism_rl.trainers.align import check_align_prompts
from prism_rl.trainers.rl import check_rl_prompts

from conftest import CONFIGS
from geo3k import INSTRUCTION, write_geo3k

GEO_ANSWER = "<think>\nThe angles of a triangle sum to 180, so x = 5.\n</think>\nThe answer is \\boxed{5}."


@pytest.fixture
def geo(tmp_path):
    return write_geo3k(tmp_path / "geo3k" / "train.parquet")


# --------------------------------------------------------------------------- the boxed reward


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{5}", "5"),
    ("first \\boxed{1} then \\boxed{ 2 }", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{a\\}}", "\\{a\\}"),          # escaped braces do not count
    ("\\fbox{7}", "7"),
    ("\\boxed{1} and a truncated \\boxed{\\frac{3", None),  # the last box is unclosed
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


VERL_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


@pytest.mark.parametrize("text", [
    GEO_ANSWER, "<think></think>\\boxed{}", "<think>a</think>b", "<think>a \\boxed{1}</think>", "\\boxed{1}",
    "<think>a</think>\\boxed{", "<think>a</think>x</think>\\boxed{1}", "<think><think></think>\\boxed{{}}",
    "x<think>a</think>\\boxed{1}", "<think>a</think>\\boxed{1}\nmore text",
])
def test_boxed_format_is_verl_geo3k_format(text):
    assert boxed_format_ok(text) == bool(VERL_FORMAT.fullmatch(text))
    assert boxed_format_ok("\n  " + text) == bool(VERL_FORMAT.fullmatch(text))  # leading white space allowed


def test_a_correct_boxed_answer_earns_the_boxed_reward_and_nothing_from_prism():
    # the mismatch this reward exists for: the PRISM reward gives a correct geo3k answer 0
    assert compute_score(GEO_ANSWER, "5").score == 0.0
    res = boxed_score(GEO_ANSWER, "5")
    assert (res.score, res.acc, res.format, res.answer) == (1.0, 1.0, 1.0, "5")
    wrong = boxed_score(GEO_ANSWER.replace("{5}", "{6}"), "5")
    assert (wrong.score, wrong.acc, wrong.format) == (pytest.approx(0.2), 0.0, 1.0)
    no_think = boxed_score("x = \\boxed{5.0}", "5")           # accuracy counts without the format
    assert (no_think.score, no_think.acc, no_think.format) == (pytest.approx(0.8), 1.0, 0.0)
    assert boxed_score("<think>a</think> 5", "5").reason == "no_boxed"
    assert boxed_score(GEO_ANSWER, "5", acc_weight=0.9, format_weight=0.1).score == pytest.approx(1.0)
    assert boxed_score(GEO_ANSWER.replace("{5}", "{6}"), "5", acc_weight=0.9, format_weight=0.1).score == \
        pytest.approx(0.1)


def test_boxed_is_a_builtin_by_name(tmp_path, capsys):
    assert load_reward_fn("boxed") is boxed_score
    assert load_reward_option("", "reward.function") is None and load_reward_option("prism", "x") is None
    res = batch_scores([GEO_ANSWER, "\\boxed{4}"], ["5", "4"], reward_fn="boxed", acc_weight=0.5, format_weight=0.5)
    assert [r.score for r in res] == [1.0, 0.5]
    with pytest.raises(ConfigError, match="reward.function=boxd: .*built-in reward \\(prism, boxed\\)"):
        load_reward_option("boxd", "reward.function")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"response": GEO_ANSWER, "ground_truth": 5}) + "\n")
    assert main(["reward", "--input", str(src), "--reward-fn", "boxed"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["score"], out["acc"], out["format"]) == (1.0, 1.0, 1.0)


def test_reward_help_documents_the_jsonl_fields(capsys):
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    text = capsys.readouterr().out
    for words in ("response", "ground_truth", '"score", "acc"', "boxed", "FILE.py:FN"):
        assert words in text


# --------------------------------------------------------------------------- the prompt check


def _rec(*messages, index=0):
    return Record(id=str(index), messages=[{"role": r, "content": c} for r, c in messages], source="f.parquet",
                  index=index)


def test_asked_conventions():
    assert asked_conventions([{"role": "user", "content": "<image>Find x. " + INSTRUCTION}]) == ("boxed",)
    assert asked_conventions([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Q"}]) \
        == ("prism",)
    r1 = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    assert asked_conventions([{"role": "user", "content": r1}]) == ("answer",)
    assert asked_conventions([{"role": "user", "content": "Think inside <think> tags."}]) == ("think",)
    assert asked_conventions([{"role": "user", "content": "How many?"}]) == ()
    # an earlier assistant turn is an answer, not an instruction
    assert asked_conventions([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\\boxed{1}"},
                              {"role": "user", "content": "Q2"}]) == ()


def test_a_foreign_instruction_stops_with_both_formats_named(geo):
    records = read_records(geo)
    with pytest.raises(PromptFormatError) as err:
        check_prompts(records, "prism", "reward.function: built-in 'prism'", ["fix A", "fix B"])
    msg = str(err.value)
    assert msg.startswith(f"{geo}, record 0, field 'prompt': the prompt asks for \\boxed{{}} answers, but the reward "
                          "(reward.function: built-in 'prism') scores <caption>/<think>/<answer> responses")
    assert "(4 of 4 prompts ask for another format). Fix: fix A; or fix B" in msg
    assert check_prompts(records, "boxed", "boxed", []) == 0
    prism = _rec(("system", SYSTEM_PROMPT), ("user", "Q"))
    with pytest.raises(PromptFormatError, match="asks for <caption>/<think>/<answer> responses, but the reward"):
        check_prompts([prism], "boxed", "boxed", [])


def test_prompts_without_an_instruction_pass_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="prism_rl.data.prompt_format"):
        assert check_prompts([_rec(("user", "How many?")), _rec(("system", SYSTEM_PROMPT), ("user", "Q"))],
                             "prism", "r", []) == 1
    assert "1 of 2 prompts (f.parquet, ...) ask for no response format" in caplog.text


def test_stage_checks_name_their_switches(geo):
    records = read_records(geo)
    cfg = RLConfig(data={"train": str(geo)})
    with pytest.raises(PromptFormatError, match=r"reward.function to .*prism data convert .*--prism-format.*"
                                                r"data.check_prompt_format=false"):
        check_rl_prompts(records, cfg)
    check_rl_prompts(records, RLConfig(data={"train": str(geo)}, reward={"function": "boxed"}))
    check_rl_prompts(records, RLConfig(data={"train": str(geo), "check_prompt_format": False}))
    check_rl_prompts(records, RLConfig(reward={"function": str(geo) + ":fn"}))  # a plug-in: format unknown
    with pytest.raises(PromptFormatError, match="alignment's format penalty"):
        check_align_prompts(records, AlignConfig(data={"train": str(geo)}))


def test_the_difficulty_filter_checks_before_loading_the_model(geo, tmp_path):
    with pytest.raises(PromptFormatError, match="--no-prompt-check"):
        filter_difficulty(str(tmp_path / "no-model"), str(geo), str(tmp_path / "out.parquet"))
    with pytest.raises(FileNotFoundError):  # past the check: it got to loading the (missing) model
        filter_difficulty(str(tmp_path / "no-model"), str(geo), str(tmp_path / "out.parquet"), reward="boxed")


# --------------------------------------------------------------------------- rewriting to the PRISM format


def test_to_prism_format_replaces_the_instruction_with_the_system_prompt(geo):
    rec = to_prism_format(read_records(geo)[0])
    assert rec.messages == [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": "<image>Find x. Round to the nearest tenth if necessary. "
                                                        "(figure 0)"}]
    assert asked_conventions(rec.messages) == ("prism",)
    tangled = _rec(("user", "<image>Find x and put it in \\boxed{} please"))
    with pytest.raises(BadField, match="'\\\\\\\\boxed' is inside a sentence that stays"):
        to_prism_format(tangled)
    history = _rec(("user", "Q. Answer in \\boxed{}."), ("assistant", make_response("c", "t", "1")), ("user", "Q2"))
    assert to_prism_format(history).messages[1:] == [{"role": "user", "content": "Q."},
                                                     {"role": "assistant", "content": make_response("c", "t", "1")},
                                                     {"role": "user", "content": "Q2"}]


def test_convert_cli_makes_the_file_pass_the_prism_check(geo, tmp_path, capsys):
    out = tmp_path / "geo3k_prism.parquet"
    assert main(["data", "convert", str(geo), "--out", str(out), "--prism-format"]) == 0
    assert json.loads(capsys.readouterr().out) == {"records": 4, "prompts_rewritten": 4}
    converted = read_records(out)
    assert check_prompts(converted, "prism", "r", []) == 0
    assert [r.ground_truth for r in converted] == ["5", "6", "7", "8"]
    assert all(len(r.images) == 1 for r in converted)


def test_rl_on_geo3k_stops_unless_the_reward_scores_its_format(geo, tiny_model_dir, tmp_path, capsys):
    args = ["rl", "--config", str(CONFIGS / "quickstart" / "rl.yaml"), f"model.path={tiny_model_dir}",
            f"data.train={geo}", "data.eval=", "rollout.n=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6",
            "train.steps=3", "algo.micro_batch_size=4"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"prism rl: error: {geo}, record 0, field 'prompt': the prompt asks for \\boxed{{}} answers, "
                          "but the reward (reward.function: built-in 'prism') scores <caption>/<think>/<answer>")
    assert main([*args, f"output_dir={tmp_path / 'b'}", "reward.function=boxed", "--halt-at-step", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"stopped at step 1, checkpoint: {tmp_path / 'b' / 'checkpoint-1'} (continue with --resume)")
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start" and "rollout/reward" in rows[1]
