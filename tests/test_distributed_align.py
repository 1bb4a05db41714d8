"""The discriminator warm-up and the alignment game under torchrun (FSDP2, gloo, CPU): 2
processes give the 1-process result on the same global batch.

Both runs go through the CLI (``prism disc warmup``, ``prism align``). The discriminator's
dropout is set to 0 here: dropout draws follow the rows a rank holds, so with dropout on the
runs agree in distribution only. The alignment reference sets ``align.seed_per_prompt=true``
(the torchrun default): each prompt's group is sampled under its own seed, so both runs sample
the same rollouts. Tolerances as in test_distributed.py: sums are added in another order.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prism_rl.cli import main
from test_distributed import torchrun

from conftest import CONFIGS

QUICKSTART = CONFIGS / "quickstart"


def memorise_response(tiny, data, out, steps: int = 100):
    """The tiny model trained (100 AdamW steps, ~5 s) to answer every alignment prompt with one
    PRISM-format response, so that sampling at temperature 1 gives both format-valid rollouts
    (scored by the discriminator) and invalid ones (penalised): the random tiny model's are all
    invalid, which would leave the discriminator's Bradley-Terry terms untested."""
    from prism_rl.config import ModelConfig
    from prism_rl.data.records import BadRecords
    from prism_rl.data.stream import prompt_pool
    from prism_rl.format import make_response
    from prism_rl.models.loading import load_policy

    model, proc = load_policy(ModelConfig(path=str(tiny)), torch.device("cpu"), trainable=True)
    pool = prompt_pool(str(data), proc, max_prompt_length=2048, limit=None, skip_bad=False, bad=BadRecords())
    resp = proc.tokenizer(make_response("- a red circle", "1 + 2 = 3.", "3") + "<|im_end|>", return_tensors="pt").input_ids[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(steps):
        p = pool[i % len(pool)]
        ids = torch.cat([p.input_ids, resp])[None]
        labels = ids.masked_fill(torch.arange(ids.shape[1]) < p.prompt_len, -100)
        images = {} if p.pixel_values is None else {"pixel_values": p.pixel_values, "image_grid_thw": p.image_grid_thw}
        mm = torch.cat([p.mm_token_type_ids, torch.zeros_like(resp)])[None]
        model(input_ids=ids, labels=labels, mm_token_type_ids=mm, **images).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def game(tiny_model_dir, tmp_path_factory):
    """Synthetic alignment data, a policy that often answers in the PRISM format, a
    discriminator upcycled from it (dropout 0) and warm-up pairs whose students are the
    teachers with a wrong answer."""
    from prism_rl.data.layouts import read_records

    root = tmp_path_factory.mktemp("dist_align")
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--n", "40", "--seed", "5"]) == 0
    torch.manual_seed(0)
    memorise_response(tiny_model_dir, data / "align.parquet", root / "policy")
    assert main(["disc", "init", "--from", str(root / "policy"), "--out", str(root / "disc")]) == 0
    cfg_file = root / "disc" / "prism_discriminator.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"dropout": 0.0}))
    recs = read_records(data / "align.parquet")[:12]
    samples = root / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": r.id, "response": r.extra["teacher_response"].replace(
        f"<answer>\n{r.ground_truth}\n</answer>", "<answer>\n999\n</answer>")}) + "\n" for r in recs))
    assert main(["data", "build-pairs", "--curated", str(data / "align.parquet"), "--samples", str(samples),
                 "--out", str(root / "pairs.jsonl")]) == 0
    return root


def _rows(run_dir, key: str) -> list[dict]:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if key in r]


def _assert_weights_close(a: dict, b: dict, start: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k in start) > 1e-3   # the weights did move
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=atol), (k, float((a[k] - b[k]).abs().max()))


def _disc_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors") | {"value_head": load_file(folder / "value_head.safetensors")["weight"]}


def _warmup_args(game, out) -> list[str]:
    return ["disc", "warmup", "--config", str(QUICKSTART / "warmup.yaml"), f"disc.path={game / 'disc'}",
            f"data.train={game / 'pairs.jsonl'}", f"output_dir={out}", "train.max_steps=3", "train.batch_size=4",
            "disc.batch_size=2", "train.heldout_frac=0.375", "train.eval_every=2", "train.log_every=1",
            "optim.lr=1e-3"]


def test_warmup_on_two_processes_equals_one_process(game, tmp_path):
    """Three warm-up steps of 4 pairs: each rank scores 2 (token-balanced), the BT mean and the
    aux term are normalised by the global 4 pairs and the gradient scaled by N; losses, held-out
    metrics (3 of the 8 pairs held out: padded to 4 on 2 ranks) and the final discriminator agree.
    ``disc.batch_size=2`` makes every scoring pass one sequence pair in both runs, so the
    router's load-balancing loss (a per-pass statistic) is the same too. The 2-process run keeps
    the discriminator's shards in host memory (``disc.cpu_offload``), which must not change a
    number; in one process that setting is refused, naming it."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_warmup_args(game, one)) == 0
    torchrun(2, "-m", "prism_rl.cli", *_warmup_args(game, two), "train.save_every=2", "disc.cpu_offload=true")
    _assert_same_warmup(one, two, game)
    assert _chunks(two / "checkpoint-2") == {2}      # every discriminator tensor was held in two shards
    assert main(_warmup_args(game, tmp_path / "offload_one") + ["disc.cpu_offload=true"]) == 2


def _chunks(ckpt) -> set[int]:
    """How many pieces each weight of a sharded checkpoint's discriminator was written in."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    return {len(m.chunks) for k, m in meta.items() if k.startswith("model.") and ".layers." in k and hasattr(m, "chunks")}


@pytest.mark.slow
def test_warmup_halted_on_two_processes_resumes_and_odd_batches_are_refused(game, tmp_path):
    """The 2-process warm-up halted at step 2 writes a sharded checkpoint (no discriminator
    folder: before the fix the resume failed, reading one) and, resumed, ends as the 1-process
    run does. A batch of pairs that does not split over the processes is refused."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_warmup_args(game, one)) == 0
    torchrun(2, "-m", "prism_rl.cli", *_warmup_args(game, two), "--halt-at-step", "2")
    assert len(list((two / "checkpoint-2" / "dcp").glob("*.distcp"))) == 2
    torchrun(2, "-m", "prism_rl.cli", *_warmup_args(game, two), "--resume")
    _assert_same_warmup(one, two, game)
    err = torchrun(2, "-m", "prism_rl.cli", *_warmup_args(game, tmp_path / "odd"), "train.batch_size=3", ok=False,
                   timeout=120)
    assert "train.batch_size (3) must be a multiple of the number of processes (2)" in err


def _assert_same_warmup(one, two, game) -> None:
    """Per-step losses and metrics, held-out metrics and final weights of two warm-up runs agree."""
    r1, r2 = _rows(one, "disc/loss"), _rows(two, "disc/loss")
    assert len(r1) == len(r2) == 3 and r1[0]["disc/loss"] != r1[-1]["disc/loss"]
    for a, b in zip(r1, r2):
        for k in ("disc/loss", "disc/bt_cap", "disc/bt_reason", "disc/aux_loss", "disc/cap_gap", "disc/reason_acc",
                  "disc/grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
        assert b["disc/expert_load"] == pytest.approx(a["disc/expert_load"], abs=1e-6)
    ev1, ev2 = _rows(one, "disc/heldout_cap_gap"), _rows(two, "disc/heldout_cap_gap")
    assert len(ev1) == len(ev2) == 2 and ev1[0]["disc/heldout_pairs"] == 3
    for a, b in zip(ev1, ev2):
        for k in ("disc/heldout_cap_gap", "disc/heldout_reason_gap", "disc/heldout_bt_cap", "disc/heldout_cap_acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["before"] == pytest.approx(s1["before"], rel=1e-4, abs=1e-6)
    _assert_weights_close(_disc_weights(one / "final"), _disc_weights(two / "final"),
                          _disc_weights(game / "disc"), atol=2e-5)


def _align_args(game, out, *extra: str) -> list[str]:
    return ["align", "--config", str(QUICKSTART / "align.yaml"), f"model.path={game / 'policy'}", f"disc.path={game / 'disc'}",
            f"data.train={game / 'data' / 'align.parquet'}", f"output_dir={out}", "rollout.n=4",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=40", "train.steps=2", "disc.batch_size=2",
            "optim.lr=1e-3", "disc_optim.lr=1e-3", *extra]


def test_align_on_two_processes_equals_one_process(game, tmp_path):
    """Two alignment steps, 4 prompts x 4 rollouts: each rank samples 2 whole groups under
    per-prompt seeds, scores them with its share of the sharded discriminator, updates the
    discriminator with the global |V| and B and the policy with the global token count. Every
    logged disc/, actor/ and rollout/ metric and both final models match the 1-process run."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_align_args(game, one, "align.seed_per_prompt=true")) == 0
    torchrun(2, "-m", "prism_rl.cli", *_align_args(game, two))
    r1, r2 = _rows(one, "actor/pg_loss"), _rows(two, "actor/pg_loss")
    assert len(r1) == len(r2) == 2
    assert any(r["rollout/format"] > 0 for r in r1) and any(r["rollout/format"] < 1 for r in r1)  # valid and invalid
    for a, b in zip(r1, r2):
        assert b["rollout/response_len_mean"] == a["rollout/response_len_mean"]   # the same samples
        for k, v in a.items():
            if k.split("/")[0] in ("actor", "disc", "rollout") and k != "disc/expert_load" and "idle" not in k:
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        assert b["disc/expert_load"] == pytest.approx(a["disc/expert_load"], abs=1e-6)
    assert abs(r1[0]["actor/adv_abs_mean"]) > 0.1 and r1[0]["disc/loss"] > 0
    assert all(r["disc/idle_passes"] == r["disc/idle_score_passes"] == 0 for r in r1)   # one process: none
    # the ranks' valid rollouts differed: the rank with fewer ran idle passes to keep FSDP2 in step
    # (before the fix, agreeing on the count after scoring hung the run)
    assert sum(r["disc/idle_passes"] for r in r2) > 0 and sum(r["disc/idle_score_passes"] for r in r2) > 0
    start = load_file(game / "policy" / "model.safetensors")
    _assert_weights_close(load_file(one / "final" / "policy" / "model.safetensors"),
                          load_file(two / "final" / "policy" / "model.safetensors"), start, atol=1e-4)
    _assert_weights_close(_disc_weights(one / "final" / "disc"), _disc_weights(two / "final" / "disc"),
                          _disc_weights(game / "disc"), atol=1e-4)


@pytest.mark.slow
def test_align_halted_on_two_processes_resumes_on_one(game, tmp_path):
    """Alignment stopped after step 1 on 2 processes (a sharded checkpoint: policy, discriminator,
    both optimizers) and resumed as one process ends where the uninterrupted 1-process run does:
    the same step-2 metrics and both final models. Per-prompt seeds on both sides, so the
    samples do not depend on the number of processes."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_align_args(game, one, "align.seed_per_prompt=true")) == 0
    torchrun(2, "-m", "prism_rl.cli", *_align_args(game, two, "align.seed_per_prompt=true"), "--halt-at-step", "1")
    assert len(list((two / "checkpoint-1" / "dcp").glob("*.distcp"))) == 2
    assert main(_align_args(game, two, "align.seed_per_prompt=true") + ["--resume"]) == 0
    starts = _rows(two, "event")
    assert [r["event"] for r in starts if r["event"] == "start"] == ["start", "start"]
    assert [r["resumed_from"] for r in starts if r["event"] == "start"][1]    # it resumed, not restarted
    assert [r["step"] for r in _rows(two, "actor/pg_loss")] == [1, 2]       # step 1 is not run again
    a, b = _rows(one, "actor/pg_loss")[-1], _rows(two, "actor/pg_loss")[-1]
    assert a["step"] == b["step"] == 2
    for k in ("actor/pg_loss", "actor/grad_norm", "disc/loss", "disc/grad_norm", "rollout/format",
              "rollout/response_len_mean"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    _assert_weights_close(load_file(one / "final" / "policy" / "model.safetensors"),
                          load_file(two / "final" / "policy" / "model.safetensors"),
                          load_file(game / "policy" / "model.safetensors"), atol=1e-4)
    _assert_weights_close(_disc_weights(one / "final" / "disc"), _disc_weights(two / "final" / "disc"),
                          _disc_weights(game / "disc"), atol=1e-4)


def test_align_prompts_that_do_not_split_over_the_processes_are_refused(game, tmp_path):
    err = torchrun(2, "-m", "prism_rl.cli", *_align_args(game, tmp_path / "odd", "rollout.prompts_per_step=3"),
                   ok=False, timeout=120)
    assert "rollout.prompts_per_step (3) must be a multiple of the number of processes (2)" in err


def test_gather_rows_in_one_process():
    """One process: ``gather_rows`` places the rows it is given (the rest stay 0)."""
    from prism_rl.distributed import gather_rows

    table = gather_rows(torch.tensor([[1.5, 2.0], [3.0, 4.0]]), [2, 0], 3)
    assert table.tolist() == [[3.0, 4.0], [0.0, 0.0], [1.5, 2.0]] and table.dtype == torch.float64


def test_seeded_alignment_samples_do_not_depend_on_the_batch(game):
    """``align.seed_per_prompt``: one batched call whose responses are keyed by (step, the
    prompt's index in the step's batch, sample), so a rank holding groups 1 and 3 samples what
    the full batch samples for them, with their global group ids; another step samples anew."""
    from prism_rl.config import AlignConfig, ModelConfig
    from prism_rl.data.layouts import read_records
    from prism_rl.data.processing import encode_prompt
    from prism_rl.models.loading import load_policy
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine
    from prism_rl.trainers.align import sample

    model, proc = load_policy(ModelConfig(path=str(game / "policy")), torch.device("cpu"), trainable=False)
    prompts = [encode_prompt(proc, r) for r in read_records(game / "data" / "align.parquet")[:4]]
    cfg = AlignConfig.model_validate({"align": {"seed_per_prompt": True}})
    engine, params = HFEngine(model, proc), SamplingParams(n=2, max_new_tokens=10, temperature=1.0)
    full = sample(engine, prompts, [0, 1, 2, 3], params, cfg, step=3)
    part = sample(engine, [prompts[1], prompts[3]], [1, 3], params, cfg, step=3)
    rows = lambda ro, idx: [ro.response_ids[r][ro.response_mask[r].bool()].tolist() for r in idx]  # noqa: E731
    assert rows(part, range(4)) == rows(full, [2, 3, 6, 7])
    assert part.group_ids.tolist() == [1, 1, 3, 3] and full.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rows(sample(engine, prompts, [0, 1, 2, 3], params, cfg, step=4), range(8)) != rows(full, range(8))

