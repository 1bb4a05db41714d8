"""The run helper every trainer uses: checkpoint rotation, step loop, logging cadence, timers,
stop on SIGTERM/SIGINT, and a halted run resumed to exactly the weights of an uninterrupted one."""

import json
import os
import signal

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from prism_rl.trainers.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from prism_rl.trainers.interrupt import Abort, last_stop
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


def _train(out, steps, halt=None, resume=False, save_every=2, log_every=2, signals=(), signal_at=None, crash_at=None):
    """Noisy SGD on a toy model: the noise comes from the global RNG, so an exact resume needs
    the model, the optimizer, the RNG state and the data position (``counter``, advanced at
    the start of a step as a data stream is) restored. ``signals`` are sent to this process
    in the middle of step ``signal_at``; ``crash_at`` raises in the middle of that step."""
    cfg = _Cfg(output_dir=str(out), train=_Train(save_every=save_every, log_every=log_every))
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
            counter.n += 1
            if step == signal_at:
                for sig in signals:
                    os.kill(os.getpid(), sig)
            if step == crash_at:
                raise RuntimeError("crash")
            with run.timer("work"):
                loss = ((model.w - torch.randn(3)) ** 2).sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_it_and_stops(tmp_path, capfd, sig):
    """A signal in the middle of step 4 (its data already drawn) lets step 4 finish; the
    checkpoint holds step 4 with the data position after it, so the resumed run ends with the
    uninterrupted run's weights; the handlers in place before the run are back afterwards."""
    before = signal.getsignal(sig)
    ckpt, _, n = _train(tmp_path, steps=7, save_every=None, log_every=1, signals=[sig], signal_at=4)
    assert ckpt == tmp_path / "checkpoint-4" and n == 4 and last_stop() == sig.name
    assert f"toy: {sig.name} received: finishing step 4, then saving a checkpoint and stopping (a second signal " \
           "stops at once, losing the steps since the start)" in capfd.readouterr().err
    assert signal.getsignal(sig) is before
    name = sig.name
    assert outcome(ckpt, "final model", stopped_by=last_stop()) == \
        f"stopped by {name} after step 4, checkpoint: {ckpt} (continue with --resume)"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1] == {"step": 4, "time": rows[-1]["time"], "event": "stop", "signal": name}
    final, resumed, n = _train(tmp_path, steps=7, resume=True, save_every=None, log_every=1)
    _, straight, _ = _train(tmp_path / "straight", steps=7, save_every=None)
    assert final.name == "final" and n == 7 and last_stop() is None and torch.equal(resumed, straight)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "actor/loss" in r]
    assert steps == list(range(1, 8))


def test_a_signal_at_a_checkpoint_step_saves_once(tmp_path):
    """Stopping at a step that ``save_every`` just saved returns that checkpoint."""
    ckpt, _, _ = _train(tmp_path, steps=7, save_every=2, signals=[signal.SIGTERM], signal_at=4)
    assert ckpt.name == "checkpoint-4" and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_aborts_at_once_without_saving(tmp_path, sig):
    before = signal.getsignal(sig)
    with pytest.raises(Abort) as info:
        _train(tmp_path, steps=7, save_every=2, signals=[sig, sig], signal_at=3)
    assert info.value.exit_code == 128 + sig
    assert str(info.value) == (f"stopped at once by a second {sig.name} in step 3; nothing saved since "
                               f"{tmp_path / 'checkpoint-2'} (continue with --resume)")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert signal.getsignal(sig) is before


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run that died in step 6 had logged step 5 after its checkpoint at 4 (and a torn line):
    resumed from step 4, it logs 5 again, so the old row of step 5 and the torn line go."""
    with pytest.raises(RuntimeError):
        _train(tmp_path, steps=7, save_every=2, log_every=1, crash_at=6)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "actor/lo')
    _, resumed, _ = _train(tmp_path, steps=7, resume=True, save_every=2, log_every=1)
    _, straight, _ = _train(tmp_path / "straight", steps=7)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "actor/loss" in r] == list(range(1, 8))
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(0, "start"), (4, "start")]
    assert torch.equal(resumed, straight)


def test_outcome_of_a_two_model_stage(tmp_path):
    """Alignment returns its policy's sub-folder: of a checkpoint when halted, of final/ when done."""
    halted = tmp_path / "checkpoint-12" / "policy"
    assert outcome(halted, "aligned policy") == f"stopped at step 12, checkpoint: {halted} (continue with --resume)"
    assert outcome(tmp_path / "final" / "policy", "aligned policy") == f"aligned policy: {tmp_path / 'final' / 'policy'}"
    assert outcome(tmp_path / "checkpoint-3" / "final", "x").startswith("x: ")  # a run folder named like one
