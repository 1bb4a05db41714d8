"""``prism rl`` and ``prism eval`` under torchrun (gloo, CPU): two "nodes" on one host,
resuming on another number of processes, CPU offload, rollout and eval metrics over all ranks.

The runs use the tiny model and a plug-in reward (``dist_rl_reward.py``) that varies between
samples, so the groups have non-zero advantages and the weights move.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from safetensors.torch import load_file

from prism_rl.cli import main
from test_distributed import _env, torchrun

from conftest import CONFIGS, ROOT

REWARD = f"{ROOT / 'tests' / 'dist_rl_reward.py'}:reward"


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distrl")
    assert main(["data", "synth", "--out", str(root / "data"), "--n", "40", "--seed", "3"]) == 0
    return root / "data"


def _rl_args(model_dir, data, out, *extra: str) -> list[str]:
    return ["rl", "--config", str(CONFIGS / "quickstart" / "rl.yaml"), f"model.path={model_dir}",
            f"data.train={data / 'align.parquet'}", "data.eval=", f"output_dir={out}", "train.steps=2",
            "rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=12", "rollout.temperature=1.0",
            "train.save_every=100", "optim.lr=1e-3", f"reward.function={REWARD}", "data.check_prompt_format=false",
            *extra]


def _rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "actor/pg_loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, timeout: int = 240) -> None:
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice on this host, one agent per "node",
    meeting at a c10d rendezvous on a free local port; fails the test with their output."""
    port, rid = _free_port(), uuid.uuid4().hex[:8]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rid, *args],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for node in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        pytest.fail(f"two-node torchrun timed out after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-6000:]


def _assert_same_run(a, b, rel=1e-5, atol=1e-4) -> None:
    """Same steps, losses, grad norms, rollout metrics and final weights. The weights get atol 1e-4
    as in test_grpo_steps_on_two_processes_equal_one_process: AdamW at lr 1e-3 turns gradient
    rounding of ~1e-7 (1 vs 2 processes add in another order) into weight differences ~5e-5."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for k in ("actor/pg_loss", "actor/grad_norm", "rollout/reward", "rollout/response_len_mean"):
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-6), (x["step"], k)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) <= atol, k


def _moved(run_dir, model_dir) -> float:
    w, start = load_file(run_dir / "final" / "model.safetensors"), load_file(model_dir / "model.safetensors")
    return max(float((w[k] - start[k]).abs().max()) for k in w)


def test_rl_on_two_nodes_equals_one_node_with_two_processes(tiny_model_dir, rl_data, tmp_path):
    """Two agents (``--nnodes 2``, a c10d rendezvous on localhost) are the same 2-rank job as
    ``--standalone --nproc-per-node 2``: two GRPO steps give the same losses and weights."""
    nodes, standalone = tmp_path / "nodes", tmp_path / "standalone"
    two_nodes("-m", "prism_rl.cli", *_rl_args(tiny_model_dir, rl_data, nodes))
    torchrun(2, "-m", "prism_rl.cli", *_rl_args(tiny_model_dir, rl_data, standalone))
    assert min(r["actor/grad_norm"] for r in _rows(standalone)) > 1e-3 and _moved(standalone, tiny_model_dir) > 1e-4
    _assert_same_run(nodes, standalone, rel=1e-6, atol=1e-6)


def test_rl_with_per_row_seeds_on_two_processes_equals_one_process(tiny_model_dir, rl_data, tmp_path):
    """``rollout.per_row_seeds``: each response's noise is keyed by its prompt's place in the
    global batch, so 2 processes sample what 1 samples, and train to the same weights. With a
    KL term, so the FSDP2-sharded reference policy's log-probs enter the loss too."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: _rl_args(tiny_model_dir, rl_data, out, "rollout.per_row_seeds=true",  # noqa: E731
                                f"data.eval={rl_data / 'test.parquet'}", "train.eval_every=1", "train.eval_limit=5",
                                "algo.kl_coef=0.05")
    assert main(args(one)) == 0
    torchrun(2, "-m", "prism_rl.cli", *args(two))
    assert min(r["actor/grad_norm"] for r in _rows(one)) > 1e-3 and _moved(one, tiny_model_dir) > 1e-4
    _assert_same_run(one, two)
    for a, b in zip(_rows(one), _rows(two)):     # rollout/* and greedy eval over all ranks, not rank 0's share
        keys = sorted(k for k in a if k.startswith(("rollout/", "eval/")))
        assert len(keys) == 14 and {k for k in b if k.startswith(("rollout/", "eval/"))} == set(keys)
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-6), keys
    assert 0 < _rows(one)[0]["eval/acc"] < 1 and 0 < _rows(one)[0]["rollout/truncated_frac"] <= 1
    assert _rows(one)[1]["actor/kl"] > 0 and _rows(two)[1]["actor/kl"] == pytest.approx(_rows(one)[1]["actor/kl"], rel=1e-4)


@pytest.mark.slow
def test_rl_resumes_on_another_number_of_processes(tiny_model_dir, rl_data, tmp_path):
    """Halted at step 2 of 4 on 2 processes and resumed on 1, or halted on 1 and resumed on 2:
    each ends where the uninterrupted 2-process run ends (per-step losses, rollout metrics,
    weights). Needs ``rollout.per_row_seeds`` (the samples of steps 3-4 must not depend on the
    number of processes that draws them) and the prompt stream's position from the checkpoint."""
    full, down, up = tmp_path / "full", tmp_path / "down", tmp_path / "up"
    args = lambda out: _rl_args(tiny_model_dir, rl_data, out, "rollout.per_row_seeds=true", "train.steps=4")  # noqa: E731
    torchrun(2, "-m", "prism_rl.cli", *args(full))
    torchrun(2, "-m", "prism_rl.cli", *args(down), "--halt-at-step", "2")
    assert (down / "checkpoint-2" / "dcp" / ".metadata").is_file()
    assert main([*args(down), "--resume"]) == 0
    assert main([*args(up), "--halt-at-step", "2"]) == 0
    assert (up / "checkpoint-2" / "model.safetensors").is_file()
    torchrun(2, "-m", "prism_rl.cli", *args(up), "--resume")
    assert [r["step"] for r in _rows(full)] == [1, 2, 3, 4] and min(r["actor/grad_norm"] for r in _rows(full)) > 1e-3
    _assert_same_run(full, down)
    _assert_same_run(full, up)


def test_cpu_offload_is_an_error_in_one_process(tiny_model_dir, rl_data, tmp_path, capsys):
    """One process shards nothing, so ``model.cpu_offload`` would do nothing: refused, named."""
    assert main(_rl_args(tiny_model_dir, rl_data, tmp_path / "one", "model.cpu_offload=true")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("prism rl: error: model.cpu_offload=true applies only under torchrun")
    assert not (tmp_path / "one" / "metrics.jsonl").exists()


def test_rl_with_cpu_offload_on_two_processes_trains_as_without(tiny_model_dir, rl_data, tmp_path):
    """FSDP2's CPUOffloadPolicy on a gloo CPU mesh (unpinned: pinning needs a CUDA driver):
    the same losses and weights as without it, also through a sharded checkpoint (halted at
    step 1, resumed)."""
    plain, off = tmp_path / "plain", tmp_path / "off"
    torchrun(2, "-m", "prism_rl.cli", *_rl_args(tiny_model_dir, rl_data, plain))
    args = _rl_args(tiny_model_dir, rl_data, off, "model.cpu_offload=true")
    torchrun(2, "-m", "prism_rl.cli", *args, "--halt-at-step", "1")
    torchrun(2, "-m", "prism_rl.cli", *args, "--resume")
    assert min(r["actor/grad_norm"] for r in _rows(plain)) > 1e-3 and _moved(plain, tiny_model_dir) > 1e-4
    _assert_same_run(plain, off, rel=1e-6, atol=1e-6)


def _eval_files(root) -> tuple[list[str], dict]:
    part = next(root.glob("*/heldout-test"))
    summary = json.loads((part / "summary.json").read_text())
    for k in ("wall_s", "gen_tokens_per_s"):
        summary.pop(k)
    return (part / "samples.jsonl").read_text().splitlines(), summary


def test_eval_on_two_processes_writes_what_one_process_writes(tiny_model_dir, rl_data, tmp_path, capsys):
    """``prism eval`` of a held-out file under torchrun: each rank decodes a share (7 prompts:
    4 + 3, uneven), rank 0 writes the same samples (same rows, same order) and summary as one
    process; a rerun finds everything done."""
    args = lambda out: ["eval", "--model", str(tiny_model_dir), "--data", str(rl_data / "test.parquet"),  # noqa: E731
                        "--out", str(out), "--max-new-tokens", "8", "--limit", "7", "generation.batch_size=3"]
    assert main(args(tmp_path / "one")) == 0
    out = torchrun(2, "-m", "prism_rl.cli", *args(tmp_path / "two"))
    rows1, sum1 = _eval_files(tmp_path / "one")
    rows2, sum2 = _eval_files(tmp_path / "two")
    assert len(rows1) == 7 and [json.loads(r)["id"] for r in rows1] == [json.loads(r)["id"] for r in rows2]
    assert rows2 == rows1 and sum2 == sum1 and sum1["generated_now"] == 7
    assert out.count("prism eval: held-out") == 1 and (tmp_path / "two" / "results.md").is_file()   # rank 0 prints
    torchrun(2, "-m", "prism_rl.cli", *args(tmp_path / "two"))
    assert _eval_files(tmp_path / "two")[0] == rows1
    assert json.loads(next((tmp_path / "two").glob("*/heldout-test/summary.json")).read_text())["resumed"] == 7
    capsys.readouterr()
    assert main([*args(tmp_path / "three"), "model.cpu_offload=true"]) == 2
    assert "model.cpu_offload=true: evaluation does not shard the policy" in capsys.readouterr().err


def test_benchmark_eval_under_torchrun_is_refused(tiny_model_dir, rl_data, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")     # as torchrun sets it; refused before joining any group
    assert main(["eval", "--benchmark", "MathVista", "--data", str(rl_data / "test.parquet"),
                 "--model", str(tiny_model_dir)]) == 2
    assert "--benchmark does not run under torchrun yet (held-out files do)" in capsys.readouterr().err


def test_dapo_dynamic_sampling_on_two_processes_equals_one_process(tiny_model_dir, rl_data, tmp_path):
    """DAPO under torchrun: the ranks agree on the kept groups (each rank's ids gathered per
    round) and on when to stop sampling, and the kept groups are shared out evenly again, so
    the global batch, losses and weights are the 1-process run's."""
    one, two = tmp_path / "one", tmp_path / "two"
    def args(out) -> list[str]:
        rl, *rest = _rl_args(tiny_model_dir, rl_data, out, "rollout.per_row_seeds=true", "train.steps=3",
                             "rollout.gen_batch_prompts=4", "algo.max_num_gen_batches=3",
                             f"reward.function={ROOT / 'tests' / 'dist_rl_reward.py'}:dapo_reward")
        return [rl, "--algo", "dapo", *rest]

    assert main(args(one)) == 0
    torchrun(2, "-m", "prism_rl.cli", *args(two))
    rows = _rows(one)
    assert any(r["rollout/prompts_sampled"] > r["rollout/groups_kept"] for r in rows)    # groups were dropped
    assert all(r["rollout/groups_kept"] == 2 for r in rows)
    _assert_same_run(one, two)
    for a, b in zip(rows, _rows(two)):
        for k in ("rollout/gen_rounds", "rollout/prompts_sampled", "rollout/groups_kept", "rollout/acc_all"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_kept_groups_spread_unevenly_are_shared_out_evenly(tmp_path):
    torchrun(2, str(ROOT / "tests" / "dist_share_kept.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for case, want in enumerate([[0, 1, 2, 5], [0, 1, 2, 5]]):       # 3 + 1 groups; 3 + 2, the last (7) dropped
        got = [r[case] for r in ranks]
        assert [len(set(g["groups"])) for g in got] == [2, 2]             # equal shares of whole groups
        assert sorted(x for g in got for x in g["groups"]) == sorted(w for w in want for _ in range(2))
        for g in got:                                                     # each row kept its tokens, text and score
            assert g["ids"] == g["groups"] and g["texts"] == [str(x) for x in g["groups"]]
            assert g["reward"] == pytest.approx([x / 10 for x in g["groups"]])


def test_uneven_shares_allow_a_remainder_and_balance_cost():
    from prism_rl.distributed import uneven_shares

    shares = uneven_shares([10, 1, 7, 3, 8], 2)
    assert shares == [[0, 1, 3], [2, 4]]      # rounds (10, 8) (7, 3) (1): 13 vs 15, the last item to the lighter
    assert uneven_shares([5, 5, 5], 4) == [[0], [1], [2], []] and uneven_shares([2, 1], 1) == [[0, 1]]
