"""The run helper every trainer uses: checkpoint rotation, step loop, logging cadence, timers,
save on Ctrl-C, and a halted run resumed to exactly the weights of an uninterrupted one."""

import json

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from prism_rl.trainers.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from prism_rl.trainers.run import Run, outcome, read_metrics


class _Train(BaseModel):
    seed: int = 0
    log_every: int = 2
    save_every: int | None = 2


class _Cfg(BaseModel):
    output_dir: str
    train: _Train = _Train()


class _Toy(torch.nn.Module):
    """A model with the ``save`` method checkpoints call for non-HF models."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def save(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach().clone()}, str(folder / "w.safetensors"))

    def load(self, folder):
        with torch.no_grad():
            self.w.copy_(load_file(str(folder / "w.safetensors"))["w"])


class _Counter:
    """A stateful object (like a data stream) the checkpoint must carry."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, st):
        self.n = st["n"]


def _train(out, steps, halt=None, resume=False, interrupt_at=None, save_every=2):
    """Noisy SGD on a toy model: the noise comes from the global RNG, so an exact resume needs
    the model, the optimizer, the RNG state and the data position restored."""
    cfg = _Cfg(output_dir=str(out), train=_Train(save_every=save_every))
    run = Run(cfg, "toy", resume=resume)
    model = _Toy()
    if run.ckpt is not None:
        model.load(run.ckpt)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    counter = _Counter()
    run.track({"": model}, None, {"optimizer": opt, "counter": counter})
    run.begin(steps, halt)
    with run:
        for step in run.steps():
            if step == interrupt_at:
                raise KeyboardInterrupt
            with run.timer("work"):
                loss = ((model.w - torch.randn(3)) ** 2).sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
                counter.n += 1
            run.log(step, {"actor/loss": float(loss.detach()), **run.timings()})
    final = run.finish(lambda folder: (model.save(folder), folder)[1], {"steps": run.step, "n": counter.n})
    return final, model.w.detach().clone(), counter.n


def test_checkpoints_rotate_and_ignore_incomplete_folders(tmp_path):
    model = _Toy()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"": model}, None, {"x": step}, keep=2)
    (tmp_path / "checkpoint-9").mkdir()          # no trainer state: a half-copied folder
    (tmp_path / ".tmp-checkpoint-7").mkdir()     # a save that died before its rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert not (tmp_path / "checkpoint-1").exists()


def test_steps_logging_saving_and_summary(tmp_path):
    final, _, n = _train(tmp_path, steps=5)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["event"] == "start" and rows[0]["stage"] == "toy" and rows[0]["resumed_from"] is None
    assert [r["step"] for r in rows[1:]] == [2, 4, 5]            # every log_every, and the last step
    assert all(r["timing/work_s"] > 0 and "actor/loss" in r for r in rows[1:])
    # checkpoints every save_every steps, none at the last step (the final folder is written)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert final == tmp_path / "final" and (final / "w.safetensors").exists()
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 5, "n": 5} and n == 5


def test_timings_reset_after_each_read(tmp_path):
    run = Run(_Cfg(output_dir=str(tmp_path)), "toy")
    with run.timer("a"):
        pass
    with run.timer("a"):
        pass
    first = run.timings()
    assert list(first) == ["timing/a_s"] and first["timing/a_s"] >= 0
    assert run.timings() == {}


def test_halt_then_resume_equals_uninterrupted(tmp_path):
    _, straight, _ = _train(tmp_path / "straight", steps=7)
    ckpt, _, _ = _train(tmp_path / "halted", steps=7, halt=3)
    assert ckpt.name == "checkpoint-3" and not (tmp_path / "halted" / "final").exists()
    assert outcome(ckpt, "final model") == f"stopped at step 3, checkpoint: {ckpt} (continue with --resume)"
    final, resumed, n = _train(tmp_path / "halted", steps=7, resume=True)
    assert outcome(final, "final model") == f"final model: {final}"
    assert final.name == "final" and n == 7                     # the counter's state came back too
    assert torch.equal(resumed, straight)
    steps = [r["step"] for r in read_metrics(tmp_path / "halted" / "metrics.jsonl") if "actor/loss" in r]
    assert steps == [2, 3, 4, 6, 7]                             # halt logged at 3; no step logged twice


def test_ctrl_c_saves_the_completed_steps_and_reraises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, steps=7, interrupt_at=4, save_every=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    _, resumed, n = _train(tmp_path, steps=7, resume=True, save_every=None)
    _, straight, _ = _train(tmp_path / "straight", steps=7, save_every=None)
    assert n == 7 and torch.equal(resumed, straight)


def test_outcome_of_a_two_model_stage(tmp_path):
    """Alignment returns its policy's sub-folder: of a checkpoint when halted, of final/ when done."""
    halted = tmp_path / "checkpoint-12" / "policy"
    assert outcome(halted, "aligned policy") == f"stopped at step 12, checkpoint: {halted} (continue with --resume)"
    assert outcome(tmp_path / "final" / "policy", "aligned policy") == f"aligned policy: {tmp_path / 'final' / 'policy'}"
    assert outcome(tmp_path / "checkpoint-3" / "final", "x").startswith("x: ")  # a run folder named like one
