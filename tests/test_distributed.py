"""Data parallelism with FSDP2 under torchrun (gloo, CPU): 2 processes give the 1-process result.

The reference is a plain one-process run on the same global batch (batch_size x grad_accum x
world sequences per optimizer step); the 2-process run shards the tiny model with
``fully_shard``, gives each rank half of every step's micro-batches, and divides the loss by
the global token count. Losses per step and final weights must agree to float tolerance
(summation order differs: one process adds 4 micro-batches' gradients, two processes add 2 and
then all-reduce).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from prism_rl.cli import main
from prism_rl.distributed import balanced_shares

from conftest import CONFIGS, ROOT


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(nproc: int, *args: str, timeout: int = 240, ok: bool = True) -> str:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` (a c10d rendezvous on a free local
    port) as a subprocess in its own session, so a hang is killed whole (workers included);
    fails the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert (proc.returncode == 0) == ok, out[-3000:] + err[-6000:]
    return out if ok else out + err


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["actor/loss"] for r in rows if "actor/loss" in r]


def test_balanced_shares_equal_counts_balanced_costs():
    costs = [10, 1, 7, 3, 8, 2]
    shares = balanced_shares(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(6))
    assert [len(s) for s in shares] == [3, 3]
    assert shares == [[0, 3, 5], [1, 2, 4]]   # rounds by cost (10, 8) (7, 3) (2, 1), lightest share first: 15 vs 16
    assert balanced_shares(costs, 1) == [list(range(6))]
    with pytest.raises(ValueError, match="do not split evenly over 4 ranks"):
        balanced_shares(costs, 4)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    assert main(["data", "synth", "--out", str(root / "data"), "--n", "40", "--seed", "3"]) == 0
    return root


def _sft_args(model_dir, data_root, out, grad_accum: int) -> list[str]:
    return ["sft", "--config", str(CONFIGS / "quickstart" / "sft.yaml"), f"model.path={model_dir}",
            f"data.train={data_root / 'data' / 'sft.json'}", f"output_dir={out}", "train.max_steps=3",
            "train.batch_size=2", f"train.grad_accum={grad_accum}", "train.log_every=1", "optim.warmup_ratio=0.2",
            "data.max_length=256"]


_FINISH_SCRIPT = """
import atexit, sys, time
from pathlib import Path
from prism_rl import distributed as D

out = Path(sys.argv[1])
D.init_from_env()
code = int(sys.argv[2]) if D.rank() == 1 else 0   # rank 1 fails or not; rank 0 succeeds
atexit.register(lambda: (out / f"atexit{D.rank()}").write_text(str(time.time())))
if D.rank() == 1:
    time.sleep(1.0)
(out / f"done{D.rank()}").write_text(str(time.time()))
print(f"rank {D.rank()} unflushed", end="")
D.finish(code)
raise SystemExit(99)   # not reached: finish ends the process
"""


@pytest.mark.parametrize("code", [0, 3])
def test_finish_ends_a_rank_with_its_code_after_exit_handlers(tmp_path, code):
    """``distributed.finish``: the exit code given (not the 99 after it), Python's exit handlers
    run and stdout flushed; after success rank 0 waits at the barrier for rank 1 (1 s late);
    after rank 1's error it does not wait for rank 0 (stuck at that barrier until torchrun
    stops it)."""
    script = tmp_path / "finish.py"
    script.write_text(_FINISH_SCRIPT)
    out = torchrun(2, str(script), str(tmp_path), str(code), ok=code == 0)
    assert "rank 1 unflushed" in out and float((tmp_path / "atexit1").read_text()) >= float((tmp_path / "done1").read_text())
    if code:
        assert "exitcode  : 3" in out and "exitcode  : 99" not in out
    else:
        assert "rank 0 unflushed" in out and "exitcode" not in out
        assert float((tmp_path / "atexit0").read_text()) >= float((tmp_path / "done1").read_text())


def test_sft_on_two_processes_equals_one_process(tiny_model_dir, sft_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_sft_args(tiny_model_dir, sft_data, one, grad_accum=4)) == 0        # global batch 2 x 4 x 1
    torchrun(2, "-m", "prism_rl.cli", *_sft_args(tiny_model_dir, sft_data, two, grad_accum=2))  # 2 x 2 x 2
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 3 and l1[0] > l1[-1]
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()                      # rank 0 exported a plain folder, tied head not duplicated
    moved = max(float((w1[k] - load_file(tiny_model_dir / "model.safetensors")[k]).abs().max()) for k in w1)
    assert moved > 1e-3                                # the weights did change
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=2e-5), (k, float((w1[k] - w2[k]).abs().max()))
    model = AutoModelForImageTextToText.from_pretrained(two / "final")
    assert torch.equal(model.state_dict()["model.language_model.norm.weight"], w2["model.language_model.norm.weight"])
    assert not (two / "tb").exists() or (two / "metrics.jsonl").read_text().count('"event": "start"') == 1  # rank 0 logs


def test_micro_batch_of_text_rows_from_a_batch_with_images(tiny_model_dir):
    """Found by the distributed GRPO test (one generate call per group, then concatenated): a
    micro-batch holding only the text rows of rollouts that also hold images passed an empty
    ``pixel_values`` to the model, whose vision tower raised. It now passes none, and the text
    rows' log-probs are those of the text rollouts alone."""
    from prism_rl.config import ModelConfig
    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import ImageRef, Record
    from prism_rl.models.loading import load_policy
    from prism_rl.models.logprobs import response_logprobs
    from prism_rl.rollout.base import SamplingParams, concat_rollouts, micro_batch
    from prism_rl.rollout.hf import HFEngine

    from conftest import png_bytes

    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    engine = HFEngine(model, proc)
    image = Record(id="0", messages=[{"role": "user", "content": "<image>How many?"}], images=[ImageRef(data=png_bytes())])
    text = Record(id="1", messages=[{"role": "user", "content": "Add the digits of 12345."}])
    torch.manual_seed(0)
    parts = [engine.generate([encode_prompt(proc, r)], SamplingParams(n=2, max_new_tokens=6), group_offset=i)
             for i, r in enumerate([image, text])]
    ro = concat_rollouts(parts, engine.pad_id)
    batch, P, mask = micro_batch(ro, [2, 3])
    assert "pixel_values" not in batch
    alone, P1, mask1 = micro_batch(parts[1], [0, 1])
    with torch.no_grad():
        lp = response_logprobs(model, batch, P) * mask
        lp1 = response_logprobs(model, alone, P1) * mask1
    assert torch.allclose(lp[:, :lp1.shape[1]], lp1, atol=1e-5) and lp1.abs().sum() > 0


@pytest.mark.parametrize("layout", ["spread", "one-rank"])
def test_grpo_steps_on_two_processes_equal_one_process(tiny_model_dir, tmp_path, layout):
    from dist_grpo_step import N
    """Two GRPO steps (tests/dist_grpo_step.py): whole groups per rank, rollouts on the unsharded
    rollout copy, old log-probs and the PPO update on the sharded policy, weights gathered into
    the copy for step 2. Same rollouts (so the weight sync is right), advantages, pg_loss and
    grad norm per step, and final weights within tolerance (AdamW's normalised step turns
    gradient rounding of ~1e-7 into weight differences of up to ~2e-5 at lr 1e-3). ``one-rank``:
    one image prompt, so the rank without it makes the shared vision pass's dummy calls."""
    script = ROOT / "tests" / "dist_grpo_step.py"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    out = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(one), layout], env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    torchrun(2, str(script), str(tiny_model_dir), str(two), layout)
    ref = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step, want in enumerate(ref):
        got = [r[step] for r in ranks]
        assert sorted(got[0]["adv"]) != sorted(got[1]["adv"])            # the ranks held different groups
        assert {**got[0]["responses"], **got[1]["responses"]} == want["responses"]
        adv = {**got[0]["adv"], **got[1]["adv"]}
        assert adv.keys() == want["adv"].keys()
        for g, values in want["adv"].items():
            assert adv[g] == pytest.approx(values, abs=1e-6)
        assert max(abs(v) for vs in want["adv"].values() for v in vs) > 0.5
        for r in got:
            assert r["pg_loss"] == pytest.approx(want["pg_loss"], abs=1e-6)
            assert r["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        # one tower pass per distinct image (old log-probs; update: features + backward), not one per
        # row and pass: with N samples per prompt that is 3 passes over 1/N of the rows' patches
        assert want["tower_patches"] * N == 3 * want["row_patches"]
        assert sum(r["tower_patches"] for r in got) >= want["tower_patches"]   # plus any dummy images
        if layout == "one-rank":   # exactly one rank saw images; the other ran 3 dummy images of 4 patches
            assert sorted(r["row_patches"] > 0 for r in got) == [False, True]
            assert sorted(r["tower_patches"] for r in got) == [3 * 4, want["tower_patches"]]
        assert sum(r["tower_patches"] for r in got) < 2 * want["row_patches"]   # below per-row work
    w1, w2 = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert w1.keys() - w2.keys() == {"lm_head.weight"} and not w2.keys() - w1.keys()   # the tied head: saved once
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((w1[k] - start[k]).abs().max()) for k in w2) > 1e-3
    for k in w2:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4), (k, float((w1[k] - w2[k]).abs().max()))


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_sharded_checkpoint_resumes_on_two_and_on_one_process(tiny_model_dir, sft_data, tmp_path):
    """SFT on 2 processes halted at step 2 writes a sharded checkpoint (DCP); resumed on 2
    processes it ends where the uninterrupted 2-process run ends, and resumed on 1 process
    (grad_accum 4: the same global batch) it ends there within the 1-vs-2-process tolerance. A
    one-process checkpoint (Hugging Face folder + optimizer state) resumed on 2 processes too."""
    full, halted, one = tmp_path / "full", tmp_path / "halted", tmp_path / "one"
    args = lambda out, ga: [*_sft_args(tiny_model_dir, sft_data, out, grad_accum=ga), "train.max_steps=4"]  # noqa: E731
    torchrun(2, "-m", "prism_rl.cli", *args(full, 2))
    torchrun(2, "-m", "prism_rl.cli", *args(halted, 2), "--halt-at-step", "2")
    ckpt = halted / "checkpoint-2"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "manifest.json").is_file()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0", "rank-1"]
    assert not (halted / "final").exists() and json.loads((ckpt / "trainer_state.json").read_text())["state"]["world_size"] == 2
    shutil.copytree(halted, one)
    shutil.copytree(halted, tmp_path / "bad")                   # damaged: rank 0 finds it, every rank stops
    (tmp_path / "bad" / "checkpoint-2" / "rng" / "rank-1" / "trainer_state.json").write_text("{}")
    err = torchrun(2, "-m", "prism_rl.cli", *args(tmp_path / "bad", 2), "--resume", ok=False, timeout=120)
    assert "--resume: no intact checkpoint" in err and "checkpoint-2 is damaged: rng/rank-1/trainer_state.json has" in err
    torchrun(2, "-m", "prism_rl.cli", *args(halted, 2), "--resume")
    assert main([*args(one, 4), "--resume"]) == 0
    want, w_full = _losses(full), _final_weights(full)
    assert len(want) == 4 and _losses(halted) == want          # 2 -> 2: exact
    for k, v in w_full.items():
        assert torch.equal(v, _final_weights(halted)[k]), k
    assert _losses(one)[:2] == want[:2] and _losses(one)[2:] == pytest.approx(want[2:], rel=1e-5, abs=1e-6)
    w_one = _final_weights(one)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((w_full[k] - start[k]).abs().max()) for k in w_full) > 1e-3
    for k in w_full:                                            # 2 -> 1: within the 1-vs-2-process tolerance
        assert torch.allclose(w_full[k], w_one[k], rtol=1e-4, atol=2e-5), (k, float((w_full[k] - w_one[k]).abs().max()))
    up = tmp_path / "up"                                        # 1 -> 2: a one-process checkpoint, resharded
    assert main([*args(up, 4), "--halt-at-step", "2"]) == 0
    torchrun(2, "-m", "prism_rl.cli", *args(up, 2), "--resume")
    assert _losses(up) == pytest.approx(want, rel=1e-5, abs=1e-6)
    w_up = _final_weights(up)
    for k in w_full:
        assert torch.allclose(w_full[k], w_up[k], rtol=1e-4, atol=2e-5), (k, float((w_full[k] - w_up[k]).abs().max()))


def test_sigterm_to_torchrun_saves_a_sharded_checkpoint(tiny_model_dir, sft_data, tmp_path):
    """SIGTERM to torchrun (which forwards it to its workers): the ranks agree to stop after the
    step in progress and write one intact sharded checkpoint at that step, which resumes."""
    from prism_rl.trainers.checkpoint import list_checkpoints, read_checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "prism_rl.cli",
           *_sft_args(tiny_model_dir, sft_data, out, grad_accum=2), "train.max_steps=200"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not _losses_if_any(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and sorted(p.name for p in (ckpts[0] / "rng").iterdir()) == ["rank-0", "rank-1"]
    state = read_checkpoint(ckpts[0])                     # manifest intact, trainer state reads back
    stopped = state["step"]
    assert 1 <= stopped < 200 and state["world_size"] == 2 and not (out / "final").exists()
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {"step": stopped, "event": "stop", "signal": "SIGTERM"}.items() <= events[-1].items()


def _losses_if_any(run_dir) -> list[float]:
    try:
        return _losses(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_resume_on_another_world_size_keeps_the_global_batch():
    """A checkpoint of 2 processes x grad_accum 2 continues on 1 process only with grad_accum 4
    (the same global batch; no config change), or on 4 with grad_accum 1; a global batch that
    does not split stays the checkpoint's setting, so the resume check reports the change."""
    from prism_rl.trainers.run import same_global_batch

    saved = {"train": {"grad_accum": 2, "seed": 1}, "optim": {"lr": 1e-3}}
    assert same_global_batch(saved, 2, 1) == {"train": {"grad_accum": 4, "seed": 1}, "optim": {"lr": 1e-3}}
    assert same_global_batch(saved, 2, 4)["train"]["grad_accum"] == 1
    assert same_global_batch(saved, 2, 3) is saved and same_global_batch(saved, 2, 2) is saved
    assert saved["train"]["grad_accum"] == 2                        # the checkpoint's own config is not edited
