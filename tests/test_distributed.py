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
import signal
import subprocess
import sys

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


def torchrun(nproc: int, *args: str, timeout: int = 240) -> str:
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
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return out


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
