"""Issue 15, checkpoints: `--resume` never unpickles, checks every file against the manifest and
falls back past a damaged checkpoint, refuses settings that change the training trajectory,
and no run ends (or checkpoints) with NaN/inf weights; `prism quickstart --fresh` deletes only
a quick start's own folder.

The SFT runs go through the CLI on the session's tiny model (a few seconds each)."""

import json
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prism_rl.actor import NonfiniteGuard
from prism_rl.cli import main
from prism_rl.config import ConfigError, OptimConfig, SFTConfig, load_config
from prism_rl.data.layouts import write_records, write_sharegpt_json
from prism_rl.data.records import ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.quickstart import MARKER, claim_output, clear_output, run_quickstart
from prism_rl.rollout.base import NonfiniteLogits
from prism_rl.trainers.checkpoint import CheckpointError, NonfiniteWeights, resume_checkpoint, save_checkpoint
from prism_rl.trainers.manifest import MANIFEST, write_manifest
from prism_rl.trainers.optim import build_optimizer, build_scheduler
from prism_rl.trainers.resume_config import check_resume_config, config_changes, trajectory_keys
from prism_rl.trainers.run import Run
from prism_rl.trainers.state_io import STATE_JSON, STATE_TENSORS, load_state, save_state

from conftest import overflowing_copy, png_bytes

ROOT = Path(__file__).resolve().parent.parent


class Marker:
    """An object whose unpickling creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- trainer state without pickle


def _optimizer_after_steps():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, OptimConfig(lr=1e-2), 10)
    for _ in range(2):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _same(a, b):
    """Equal trees, types included (tuples stay tuples, int keys stay ints, tensors bit-equal)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_state_round_trips_exactly_without_pickle(tmp_path):
    _, opt, sched = _optimizer_after_steps()
    random.random()
    np.random.rand()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "stream": {"epoch": 2, "pos": 7}, "odd": {"__tensor__": "not a tag", (1, "a"): [None, True, float("nan")]},
             "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "shared": [torch.ones(2)] * 2}
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    assert "optimizer/state/0/exp_avg" in load_file(tmp_path / STATE_TENSORS)
    back = load_state(tmp_path)
    _same(back, state)
    # the optimizer and the RNGs accept what came back and continue exactly
    model2, opt2, _ = _optimizer_after_steps()
    opt2.load_state_dict(back["optimizer"])
    _same(opt2.state_dict(), opt.state_dict())
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    a = (random.random(), np.random.rand())
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    assert a == (random.random(), np.random.rand())


def test_state_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="at /stream/fn: a function"):
        save_state(tmp_path, {"stream": {"fn": lambda: 0}})


# ---- a tiny SFT run through the CLI


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    recs = [Record(id=f"r{i}", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": "<image>How many red circles?"}],
                   images=[ImageRef(data=png_bytes())], response=make_response("- a red circle", f"{i} circles", str(i)),
                   source="mem", index=i) for i in range(8)]
    path = tmp_path_factory.mktemp("data") / "sft.json"
    write_sharegpt_json(recs, path)
    return path


def _sft(tiny, data, out, *extra):
    return ["sft", f"model.path={tiny}", f"data.train={data}", f"output_dir={out}", "train.max_steps=6",
            "train.batch_size=2", "train.log_every=1", "train.save_every=2", *extra]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sft_file, tmp_path_factory):
    """(args maker, an uninterrupted run's final weights, a run halted at step 4 with checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    args = lambda out, *extra: _sft(tiny_model_dir, sft_file, out, *extra)  # noqa: E731
    assert main(args(root / "straight")) == 0
    assert main(args(root / "halted", "--halt-at-step", "4")) == 0
    assert sorted(p.name for p in (root / "halted").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return args, load_file(root / "straight" / "final" / "model.safetensors"), root / "halted"


def _copy(halted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(halted, out)
    return out


def _assert_final_equals(out, straight):
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == straight.keys() and all(torch.equal(final[k], straight[k]) for k in final)


def test_checkpoint_holds_no_pickle_and_resumes_exactly(runs, tmp_path):
    args, straight, halted = runs
    ckpt = halted / "checkpoint-4"
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.bin"))
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {STATE_JSON, STATE_TENSORS, "model.safetensors", "config.json", "tokenizer.json"} <= set(listed)
    out = _copy(halted, tmp_path)
    assert main(args(out, "--resume")) == 0
    _assert_final_equals(out, straight)


def test_old_pickled_state_is_refused_unread(runs, tmp_path, capsys):
    """An old-format checkpoint whose trainer_state.pt would run code when unpickled."""
    args, _, halted = runs
    out = _copy(halted, tmp_path)
    marker = tmp_path / "pwned"
    for ckpt in out.glob("checkpoint-*"):
        for name in (STATE_JSON, STATE_TENSORS, MANIFEST):
            (ckpt / name).unlink()
        torch.save({"step": 4, "x": Marker(marker)}, ckpt / "trainer_state.pt")
    assert main(args(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint-4' / 'trainer_state.pt'}: a checkpoint of an older prism-rl" in err
    assert "does not load pickles" in err
    assert not marker.exists() and not (out / "final").exists()


def test_a_pickle_in_place_of_the_state_is_never_run(runs, tmp_path, capsys):
    """A forged checkpoint: a pickle named trainer_state.safetensors, the manifest recomputed to match."""
    args, _, halted = runs
    out = _copy(halted, tmp_path)
    marker = tmp_path / "pwned"
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / STATE_TENSORS).write_bytes(pickle.dumps(Marker(marker)))
        write_manifest(ckpt)
    assert main(args(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "trainer_state.safetensors: not a readable safetensors file" in err
    assert not marker.exists()


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bytes(p):
    """Random bytes in the middle of the weights, size unchanged (they load, and train to NaN)."""
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = random.Random(0).randbytes(4096)
    p.write_bytes(bytes(data))


DAMAGE = {
    "weights truncated": ("model.safetensors", _truncate, "model.safetensors has"),
    "weights emptied": ("model.safetensors", lambda p: p.write_bytes(b""), "model.safetensors has 0 bytes"),
    "random bytes in the weights": ("model.safetensors", _flip_bytes, "model.safetensors differs from what was saved"),
    "config deleted": ("config.json", Path.unlink, "config.json is missing"),
    "tokenizer deleted": ("tokenizer.json", Path.unlink, "tokenizer.json is missing"),
    "state truncated": (STATE_TENSORS, _truncate, f"{STATE_TENSORS} has"),
    "state json deleted": (STATE_JSON, Path.unlink, f"{STATE_JSON} is missing"),
    "manifest deleted": (MANIFEST, Path.unlink, f"no {MANIFEST}"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(runs, tmp_path, caplog, case):
    args, straight, halted = runs
    out = _copy(halted, tmp_path)
    name, damage, said = DAMAGE[case]
    damage(out / "checkpoint-4" / name)
    assert main(args(out, "--resume")) == 0
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"checkpoint-4 is damaged: {said}" in lines[0]
    assert lines[0].endswith("resuming from checkpoint-2")
    _assert_final_equals(out, straight)   # steps 3-6 rerun from checkpoint-2: the same weights


def test_no_intact_checkpoint_is_a_clear_error(runs, tmp_path, capsys):
    args, _, halted = runs
    out = _copy(halted, tmp_path)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")
    (out / "checkpoint-2" / "config.json").unlink()
    assert main(args(out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"prism sft: error: --resume: no intact checkpoint in {out}: ")
    assert "checkpoint-4 is damaged: model.safetensors has 0 bytes" in err
    assert "checkpoint-2 is damaged: config.json is missing" in err
    assert not (out / "final").exists()


# ---- never NaN


def test_sft_stops_on_a_nonfinite_loss_streak_with_a_message(runs, tmp_path, capsys):
    """A learning rate that blows the weights up: before, the run ended 0 with an all-NaN model."""
    args, _, _ = runs
    out = tmp_path / "nan"
    assert main(args(out, "optim.lr=1e30", "optim.warmup_ratio=0", "optim.schedule=constant")) == 1
    err = capsys.readouterr().err
    assert "prism sft: error: " in err and "was not finite (optimizer steps skipped)" in err
    assert "Traceback" not in err
    assert not (out / "final").exists()
    for ckpt in out.glob("checkpoint-*"):   # what was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_starting_from_nonfinite_weights_is_refused(runs, tiny_model_dir, tmp_path, capsys):
    args, _, _ = runs
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(args(tmp_path / "out", f"model.path={bad}")) == 2
    err = capsys.readouterr().err
    assert "the model folder this run starts from: " in err and "hold NaN or inf" in err


def _toy_run(out, steps, poison_at=None):
    """A run whose weight turns NaN at ``poison_at``: neither a checkpoint nor the final model is written."""
    cfg = load_config(SFTConfig, None, [f"output_dir={out}", "train.save_every=2"])
    run = Run(cfg, "toy")
    model = torch.nn.Linear(2, 2)
    model.save = lambda folder: (folder.mkdir(parents=True, exist_ok=True),
                                 save_file({"w": model.weight.detach().clone()}, str(folder / "w.safetensors")))
    run.track({"": model}, None, {})
    run.begin(steps)
    with run:
        for step in run.steps():
            if step == poison_at:
                with torch.no_grad():
                    model.weight[0, 0] = float("inf")
    return run.finish(lambda folder: (model.save(folder), folder)[1], {})


def test_nonfinite_weights_are_never_saved(tmp_path):
    with pytest.raises(NonfiniteWeights, match="checkpoint at step 4: 1 weight tensors hold NaN or inf .e.g. weight"):
        _toy_run(tmp_path / "a", 6, poison_at=3)
    assert [p.name for p in (tmp_path / "a").glob("checkpoint-*")] == ["checkpoint-2"]
    with pytest.raises(NonfiniteWeights, match="final model: 1 weight tensors"):
        _toy_run(tmp_path / "b", 6, poison_at=6)
    assert not (tmp_path / "b" / "final").exists()
    assert _toy_run(tmp_path / "c", 6) == tmp_path / "c" / "final"
    lin = torch.nn.Linear(1, 1)
    with torch.no_grad():
        lin.bias.fill_(float("nan"))
    with pytest.raises(NonfiniteWeights, match="bias"):
        save_checkpoint(tmp_path / "d", 1, {"": lin}, None, {})
    assert not (tmp_path / "d").exists()


def test_guard_skips_nonfinite_steps_and_stops_a_streak():
    guard = NonfiniteGuard("run", limit=3)
    assert guard.step_ok(1, 0.5, torch.tensor(1.0))
    assert not guard.step_ok(2, float("nan"), torch.tensor(1.0))
    assert not guard.step_ok(3, 0.5, torch.tensor(float("inf")))
    assert guard.step_ok(4, 0.5, 2.0) and guard.streak == 0          # a finite step resets the streak
    assert not guard.step_ok(5, float("inf"), 1.0) and not guard.step_ok(6, float("nan"), 1.0)
    with pytest.raises(FloatingPointError, match="steps 5..7 was not finite"):
        guard.step_ok(7, float("nan"), 1.0)


def test_guard_skips_a_step_whose_rollouts_hold_nan_logits():
    """``rollouts``: the engine's NonfiniteLogits skips the step (None) and counts it; a
    finite update resets the streak; three failed rollouts in a row stop the run with the
    engine's message."""
    guard = NonfiniteGuard("run", limit=3)

    def nan():
        raise NonfiniteLogits("first-token logits are NaN/inf for 1 of the wave's 2 prompts (records {x})")

    assert guard.rollouts(lambda: "ro", 1) == "ro" and guard.streak == 0
    assert guard.rollouts(nan, 2) is None and guard.rollouts(nan, 3) is None and guard.streak == 2
    guard.check({"nonfinite_grad_skips": 0, "updates": 1}, 4)   # a step that trained
    assert guard.streak == 0
    assert guard.rollouts(nan, 5) is None and guard.rollouts(nan, 6) is None
    with pytest.raises(FloatingPointError, match=r"rollouts of steps 5\.\.7 had NaN/inf logits .*records \{x\}"):
        guard.rollouts(nan, 7)


def test_alignment_skips_steps_with_nan_logits_and_stops_after_three(tiny_model_dir, tmp_path, capsys):
    """The same policy in stage 2 (graph engine): two steps skipped and logged, the third ends
    the run with exit status 1 and the engine's message."""
    bad = overflowing_copy(tiny_model_dir, tmp_path / "overflow")
    data, disc, out = tmp_path / "data", tmp_path / "disc", tmp_path / "align"
    assert main(["data", "synth", "--out", str(data), "--n", "24", "--seed", "0"]) == 0
    assert main(["disc", "init", "--from", str(tiny_model_dir), "--out", str(disc)]) == 0
    capsys.readouterr()
    assert main(["align", "--config", str(ROOT / "configs" / "quickstart" / "align.yaml"), f"model.path={bad}",
                 f"disc.path={disc}", f"data.train={data / 'align.parquet'}", f"output_dir={out}", "train.steps=5",
                 "rollout.n=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "rollout.engine=graph",
                 "train.save_every=100"]) == 1
    err = capsys.readouterr().err
    assert "prism align: error: " in err and "the rollouts of steps 1..3 had NaN/inf logits" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("rollout/nonfinite") == 1 and r.get("train/skipped") == 1] == [1, 2]


def test_rl_skips_steps_with_nan_logits_and_stops_after_three(tiny_model_dir, tmp_path, capsys):
    """A policy whose final norm scales by 3e38 (finite weights, so the run may start; the
    hidden state then overflows to inf before the head) under the graph engine: each step's
    rollouts raise NonfiniteLogits, the steps are skipped and logged, and the third in a row
    ends the run with exit status 1 and the engine's message."""
    bad = overflowing_copy(tiny_model_dir, tmp_path / "overflow")
    data = tmp_path / "rl.parquet"
    write_records([Record(id=f"g{i}", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                                 {"role": "user", "content": "<image>How many circles?"}],
                          images=[ImageRef(data=png_bytes("red"))], ground_truth="1") for i in range(2)], data)
    out = tmp_path / "run"
    assert main(["rl", "--config", str(ROOT / "configs" / "quickstart" / "rl.yaml"), f"model.path={bad}",
                 f"data.train={data}", "data.eval=", f"output_dir={out}", "train.steps=5", "rollout.n=2",
                 "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "rollout.engine=graph",
                 "train.save_every=100"]) == 1
    err = capsys.readouterr().err
    assert "prism rl: error: " in err and "the rollouts of steps 1..3 had NaN/inf logits" in err
    assert "first-token logits are NaN/inf for 2 of the wave's 2 prompts (records g0, g1)" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("rollout/nonfinite") == 1 and r.get("train/skipped") == 1]
    assert skipped == [1, 2] and not (out / "final").exists()


# ---- resuming with other settings


def test_resume_refuses_trajectory_changes_and_keeps_config_true(runs, tmp_path, capsys):
    args, straight, halted = runs
    out = _copy(halted, tmp_path)
    before = (out / "config.yaml").read_text()
    assert main(args(out, "optim.lr=2e-5", "train.seed=3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 was trained with other settings: optim.lr 1e-05 -> 2e-05, train.seed 0 -> 3" in err
    assert "--resume-with-changes" in err and "new output_dir" in err
    assert (out / "config.yaml").read_text() == before and not (out / "final").exists()
    # free keys pass and give the same weights; config.yaml says from when they apply
    assert main(args(out, "train.log_every=3", "train.save_every=5", "--resume")) == 0
    _assert_final_equals(out, straight)
    text = (out / "config.yaml").read_text()
    assert text.startswith("# settings changed during this run; these apply from step 5\n"
                           "# steps 1-4 ran with config.until-step-4.yaml\n"
                           "# changed when resuming at step 4: train.log_every 1 -> 3, train.save_every 2 -> 5\n")
    assert "log_every: 3" in text and "log_every: 1" in (out / "config.until-step-4.yaml").read_text()


def test_resume_with_changes_continues_and_records_both(runs, tmp_path):
    args, straight, halted = runs
    out = _copy(halted, tmp_path)
    assert main(args(out, "optim.lr=2e-5", "--resume-with-changes")) == 0
    final = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], straight[k]) for k in final)
    # the new learning rate is in force from step 5 (loading the optimizer state does not bring the old one back)
    lr = {r["step"]: r["actor/lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "actor/lr" in r}
    ref = {r["step"]: r["actor/lr"] for r in map(json.loads, open(halted.parent / "straight" / "metrics.jsonl"))
           if "actor/lr" in r}
    assert lr[4] == ref[4] and lr[5] == pytest.approx(2 * ref[5], rel=1e-12) and lr[6] == pytest.approx(2 * ref[6])
    assert "lr: 2.0e-05" in (out / "config.yaml").read_text()
    assert "lr: 1.0e-05" in (out / "config.until-step-4.yaml").read_text()
    assert "# changed when resuming at step 4: optim.lr 1e-05 -> 2e-05" in (out / "config.yaml").read_text()


def _changes(old_overrides, new_overrides):
    old = load_config(SFTConfig, None, old_overrides)
    new = load_config(SFTConfig, None, new_overrides)
    ch = config_changes(old.model_dump(mode="json"), new.model_dump(mode="json"))
    return ch, trajectory_keys(ch, new.model_dump(mode="json"))


def test_which_keys_change_the_trajectory():
    ch, risky = _changes([], ["train.batch_size=4", "data.train=x.json", "model.path=m", "train.log_every=3",
                              "model.gradient_checkpointing=true", "output_dir=elsewhere"])
    assert set(ch) == {"train.batch_size", "data.train", "model.path", "train.log_every",
                       "model.gradient_checkpointing"}                # output_dir is not compared
    assert risky == ["data.train", "model.path", "train.batch_size"]
    # a longer run changes the remaining learning rates of a cosine schedule, not of a constant one
    assert _changes([], ["train.max_steps=9"])[1] == ["train.max_steps"]
    const = ["optim.schedule=constant", "optim.warmup_ratio=0"]
    assert _changes(const, [*const, "train.max_steps=9"])[1] == []
    steps = ["optim.schedule=constant", "optim.warmup_steps=2"]
    assert _changes(steps, [*steps, "train.epochs=3"])[1] == []


def test_length_change_message_names_the_schedule(tmp_path):
    cfg = load_config(SFTConfig, None, ["train.max_steps=9"])
    saved = load_config(SFTConfig, None, []).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"train.max_steps null -> 9 \(the learning-rate schedule depends"):
        check_resume_config(cfg, saved, tmp_path / "checkpoint-2", allow_changes=False)
    assert check_resume_config(cfg, saved, tmp_path / "checkpoint-2", allow_changes=True) == {
        "train.max_steps": (None, 9)}


def test_resume_checkpoint_none_when_there_is_no_checkpoint(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()   # an empty folder: a save that never started
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"x")   # a half-copied one
    with pytest.raises(CheckpointError, match="checkpoint-3 is damaged: no manifest.json"):
        resume_checkpoint(tmp_path)


# ---- quickstart --fresh


def test_fresh_refuses_a_folder_that_is_not_a_quickstart_output(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    # workers=0 makes a quick start that got past --fresh fail at once
    with pytest.raises(ConfigError, match=r"--fresh: .*mine is not a quick start output folder .no \.prism-quickstart "
                                          r"file; it holds thesis.tex.; not deleting it"):
        run_quickstart(out, fresh=True, overrides=["workers=0"])
    assert (out / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ConfigError, match="holds other things and is not a quick start output"):
        claim_output(out)          # nor is the marker put on it by a run without --fresh
    assert not (out / MARKER).exists()
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(ConfigError, match="not a folder .a file or a link."):
        clear_output(link)
    assert (out / "thesis.tex").exists()


def test_fresh_deletes_a_quickstart_output(tmp_path):
    out = tmp_path / "qs"
    claim_output(out)
    assert (out / MARKER).is_file()
    (out / "sft").mkdir()
    (out / "sft" / "metrics.jsonl").write_text("{}\n")
    clear_output(out)
    assert not out.exists()
    clear_output(out)                       # nothing there: nothing to do
    # an earlier version's output (no marker) is recognised by what it holds, and nothing else
    (out / "logs").mkdir(parents=True)
    (out / "data").mkdir()
    (out / "data" / "stats.json").write_text("{}")
    (out / "sft_grpo_s0").mkdir()
    claim_output(out)
    assert (out / MARKER).exists()
    (out / MARKER).unlink()
    clear_output(out)
    assert not out.exists()
