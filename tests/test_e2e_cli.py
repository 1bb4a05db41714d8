"""End-to-end runs of the `prism` CLI on a very small problem (marked slow).

SFT: the loss falls, the final folder reloads with from_pretrained, and a run interrupted at
step 3 and resumed ends with exactly the weights of an uninterrupted run. RL: a short GRPO
run through the CLI, interrupted and resumed, writes its metrics and a loadable policy.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from prism_rl.cli import main

from conftest import CONFIGS

QUICKSTART = CONFIGS / "quickstart"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["data", "synth", "--out", str(root / "data"), "--n", "80", "--seed", "3"]) == 0
    assert main(["model", "tiny", "--out", str(root / "tiny"), "--data", str(root / "data")]) == 0
    return root


def _sft_args(root, out, *extra):
    return ["sft", "--config", str(QUICKSTART / "sft.yaml"), f"model.path={root / 'tiny'}",
            f"data.train={root / 'data' / 'sft.json'}", f"output_dir={out}", "train.max_steps=6",
            "train.batch_size=4", "train.grad_accum=2", "train.log_every=1", "optim.warmup_ratio=0.2", *extra]


def _assert_reloads(folder):
    """The saved policy reloads with from_pretrained as a Qwen3-VL model holding exactly the saved
    weights (the output head is tied to the embeddings, so it is not saved)."""
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() <= state.keys() and state.keys() - saved.keys() <= {"lm_head.weight"}
    for k, v in saved.items():
        assert torch.equal(state[k], v), k


def _metrics(path):
    return [json.loads(line) for line in open(path) if '"actor/loss"' in line]


@pytest.fixture(scope="module")
def straight_sft(workdir):
    """An uninterrupted 12-step SFT run (the reference for the resume test; the start of RL)."""
    straight = workdir / "sft_straight"
    assert main(_sft_args(workdir, straight, "train.max_steps=12")) == 0
    return straight


def test_sft_learns_reloads_and_resumes_exactly(workdir, straight_sft):
    straight = straight_sft
    losses = [m["actor/loss"] for m in _metrics(straight / "metrics.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    _assert_reloads(straight / "final")
    text = "<caption>\n- a red circle\n</caption>\n<think>\n1 + 2 = 3\n</think>\n<answer>\n3\n</answer>"
    saved_tok = AutoProcessor.from_pretrained(straight / "final").tokenizer
    assert saved_tok(text)["input_ids"] == AutoProcessor.from_pretrained(workdir / "tiny").tokenizer(text)["input_ids"]
    assert json.loads((straight / "summary.json").read_text())["steps"] == 12
    assert (straight / "config.yaml").exists()

    resumed = workdir / "sft_resumed"
    assert main(_sft_args(workdir, resumed, "train.max_steps=12", "--halt-at-step", "5")) == 0
    assert (resumed / "checkpoint-5" / "trainer_state.json").exists() and (resumed / "checkpoint-5" / "manifest.json").exists()
    assert not (resumed / "final").exists()
    assert main(_sft_args(workdir, resumed, "train.max_steps=12", "--resume")) == 0
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [m["step"] for m in _metrics(resumed / "metrics.jsonl")]
    assert steps == list(range(1, 13))   # 1-5 before the interruption, 6-12 after


def test_rl_runs_and_resumes(workdir, straight_sft):
    sft = straight_sft / "final"
    out = workdir / "grpo"
    args = ["rl", "--algo", "grpo", "--config", str(QUICKSTART / "rl.yaml"), f"model.path={sft}",
            f"data.train={workdir / 'data' / 'align.parquet'}", f"output_dir={out}", "train.steps=3",
            "rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=24", "train.save_every=1",
            "algo.micro_token_budget=300"]  # packed micro-batches; one epoch, one mini-batch: on-policy shortcut
    assert main(args + ["--halt-at-step", "2"]) == 0
    assert (out / "checkpoint-2").exists()
    assert main(args + ["--resume"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"rollout/reward"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0.0 <= r["rollout/reward"] <= 1.0 and r["rollout/groups_kept"] == 2 and r["actor/updates"] == 1
        assert r["actor/entropy"] > 0 and r["actor/ratio_mean"] == 1.0  # from the update's own forward
        assert r["timing/rollout_s"] > 0 and r["timing/update_s"] > 0
    _assert_reloads(out / "final")


def test_prism_stage_end_to_end_and_resume(workdir, straight_sft):
    """disc init -> pairs -> warm-up -> align (interrupted at step 1, resumed) -> plot."""
    sft = straight_sft / "final"
    disc = workdir / "disc"
    data = workdir / "data" / "align.parquet"
    assert main(["disc", "init", "--from", str(sft), "--out", str(disc / "init")]) == 0
    assert main(["disc", "pairs", "--policy", str(sft), "--data", str(data), "--out", str(disc / "pairs.jsonl"),
                 "--max-new-tokens", "48", "--limit", "12"]) == 0
    stats = json.loads((disc / "pairs.stats.json").read_text())
    assert stats["samples"] == 12 and stats["pairs"] + stats["invalid_student_skipped"] == 12
    assert stats["max_new_tokens"] == 48 and 0 <= stats["student_truncated"] <= 12
    # A policy trained for 12 steps rarely closes the format within 48 tokens, so the warm-up
    # gets deterministic students instead: teacher demonstrations with a wrong final answer,
    # paired through `prism data build-pairs` (which joins samples to demonstrations by id).
    from prism_rl.data.layouts import read_records
    recs = read_records(data)[:12]
    samples = disc / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": r.id, "response": r.extra["teacher_response"].replace(
        f"<answer>\n{r.ground_truth}\n</answer>", "<answer>\n999\n</answer>")}) + "\n" for r in recs))
    assert main(["data", "build-pairs", "--curated", str(data), "--samples", str(samples),
                 "--out", str(disc / "built.jsonl")]) == 0
    warm = ["disc", "warmup", "--config", str(QUICKSTART / "warmup.yaml"), f"disc.path={disc / 'init'}",
            f"data.train={disc / 'built.jsonl'}", "train.max_steps=2", "train.batch_size=4", "train.heldout_frac=0.25"]
    assert main(warm + [f"output_dir={disc / 'warm'}"]) == 0
    summary = json.loads((disc / "warm" / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["after"]["heldout_cap_acc"] <= 1.0
    # warm-up halted after step 1 and resumed ends with the uninterrupted run's weights
    assert main(warm + [f"output_dir={disc / 'warm2'}", "--halt-at-step", "1"]) == 0
    assert (disc / "warm2" / "checkpoint-1" / "value_head.safetensors").exists()
    assert main(warm + [f"output_dir={disc / 'warm2'}", "--resume"]) == 0
    for name in ("value_head.safetensors", "model.safetensors"):
        a, b = load_file(disc / "warm" / "final" / name), load_file(disc / "warm2" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((disc / "warm2" / "summary.json").read_text())["before"] == summary["before"]
    out = workdir / "align"
    args = ["align", "--config", str(QUICKSTART / "align.yaml"), f"model.path={sft}",
            f"disc.path={disc / 'warm' / 'final'}", f"data.train={data}", f"output_dir={out}",
            "train.steps=2", "rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=48"]
    assert main(args + ["--halt-at-step", "1"]) == 0
    ckpt = out / "checkpoint-1"
    assert (ckpt / "policy" / "model.safetensors").exists() and (ckpt / "disc" / "value_head.safetensors").exists()
    assert main(args + ["--resume"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"timing/step_s"' in line]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["rollout/format"] <= 1.0 and len(r["disc/expert_load"]) == 4 and r["actor/entropy"] > 0
        assert 0.0 <= r["rollout/perception"] <= 1.0   # synthetic prompts carry their scene
        # routing load is measured on the valid rollouts: a distribution when there are any
        load = r["disc/expert_load"]
        assert abs(sum(load) - (1.0 if r["rollout/format"] > 0 else 0.0)) < 1e-4
    _assert_reloads(out / "final" / "policy")
    assert main(["plot", str(out)]) == 0
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "expert_load.png").exists()


def test_dapo_dynamic_sampling_bookkeeping(workdir, straight_sft):
    out = workdir / "dapo"
    assert main(["rl", "--algo", "dapo", "--config", str(QUICKSTART / "rl.yaml"),
                 f"model.path={straight_sft / 'final'}", f"data.train={workdir / 'data' / 'align.parquet'}",
                 f"output_dir={out}", "train.steps=2", "rollout.n=4", "rollout.prompts_per_step=2",
                 "rollout.gen_batch_prompts=3", "algo.max_num_gen_batches=2", "rollout.max_new_tokens=24",
                 "algo.overlong_buffer=8"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"rollout/gen_rounds"' in line]
    assert len(rows) == 2
    for r in rows:
        assert 1 <= r["rollout/gen_rounds"] <= 2 and r["rollout/prompts_sampled"] == 3 * r["rollout/gen_rounds"]
        assert 0 <= r["rollout/groups_kept"] <= 2
        # a kept batch has only mixed-outcome groups, so its accuracy is strictly inside (0, 1)
        assert r.get("train/skipped") == 1 or 0.0 < r["rollout/acc"] < 1.0
