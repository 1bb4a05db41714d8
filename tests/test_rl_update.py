"""The RL update's bookkeeping: old log-probs and the PPO step do not depend on how rows are
split into micro-batches (they are length-sorted first), and the recomputed log-probs equal
the ones the sampler used."""

import pytest
import torch

from prism_rl.actor import NonfiniteGuard, by_length, ppo_update, sequence_logprobs
from prism_rl.config import AlgoConfig, ModelConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT
from prism_rl.models.loading import load_policy
from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.hf import HFEngine
from prism_rl.trainers.rl import groups_with_variance

from conftest import png_bytes

CPU = torch.device("cpu")


def _rollouts(tiny_model_dir, temperature=1.0):
    torch.manual_seed(0)
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), CPU, trainable=True)
    recs = [Record(id=str(i), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": "<image>" + q}],
                   images=[ImageRef(data=png_bytes(c))], ground_truth="1")
            for i, (c, q) in enumerate([("red", "How many?"), ("blue", "What colour is the big shape here?")])]
    prompts = [encode_prompt(proc, r) for r in recs]
    params = SamplingParams(n=3, max_new_tokens=12, temperature=temperature, return_logprobs=True)
    return model, HFEngine(model, proc).generate(prompts, params)


def test_by_length_orders_rows_by_response_then_prompt_length(tiny_model_dir):
    _, ro = _rollouts(tiny_model_dir)
    order = by_length(ro, range(len(ro)))
    keys = [(int(ro.response_mask[r].sum()), int(ro.prompt_mask[r].sum())) for r in order]
    assert sorted(order) == list(range(len(ro)))
    assert keys == sorted(keys)


def test_recomputed_logprobs_equal_sampling_logprobs_for_any_micro_batch(tiny_model_dir):
    for temperature in (1.0, 0.7):
        model, ro = _rollouts(tiny_model_dir, temperature)
        mask = ro.response_mask.bool()
        assert len(set(ro.response_lengths.tolist())) > 1  # padding is really exercised
        ref = sequence_logprobs(model, ro, micro=len(ro), device=CPU, temperature=temperature)
        for micro in (1, 4):
            lp = sequence_logprobs(model, ro, micro=micro, device=CPU, temperature=temperature)
            assert torch.allclose(lp, ref, atol=1e-5)
        assert torch.allclose(ref[mask], ro.logprobs[mask], atol=1e-4), (ref - ro.logprobs)[mask].abs().max()
        assert float(ref[~mask].abs().sum()) == 0.0


def _one_update(tiny_model_dir, micro: int, agg: str) -> torch.Tensor:
    model, ro = _rollouts(tiny_model_dir)
    old = sequence_logprobs(model, ro, micro=len(ro), device=CPU)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    algo = AlgoConfig(micro_batch_size=micro, agg=agg)
    ppo_update(model, opt, sched, ro, adv, old, algo, grad_clip=1e9, device=CPU)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_ppo_update_is_the_same_for_any_micro_batch_size(tiny_model_dir):
    for agg in ("token-mean", "seq-mean-token-mean"):
        whole = _one_update(tiny_model_dir, 6, agg)
        assert whole.abs().max() > 0
        for micro in (1, 4):
            step = _one_update(tiny_model_dir, micro, agg)
            assert torch.allclose(step, whole, atol=1e-6, rtol=1e-4), (agg, micro, (step - whole).abs().max())


def test_nonfinite_gradient_skips_the_step_and_is_counted(tiny_model_dir):
    model, ro = _rollouts(tiny_model_dir)
    old = sequence_logprobs(model, ro, micro=len(ro), device=CPU)
    adv = torch.tensor([1.0, float("nan"), 0.5, -0.5, 2.0, -2.0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    out = ppo_update(model, opt, sched, ro, adv, old, AlgoConfig(mini_batches=2), grad_clip=1.0, device=CPU)
    after = list(model.parameters())
    # one of the two mini-batches holds the NaN row: it is skipped, the other one is applied
    assert out["nonfinite_grad_skips"] == 1 and out["updates"] == 2
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_three_all_skipped_steps_in_a_row_stop_the_run():
    bad, good, partly = ({"updates": 2, "nonfinite_grad_skips": k} for k in (2, 0, 1))
    guard = NonfiniteGuard("run")
    for step, upd in enumerate([bad, bad, good, bad, partly, bad, bad], 1):
        guard.check(upd, step)
    assert guard.streak == 2
    with pytest.raises(FloatingPointError, match=r"run: every update of steps 6\.\.8"):
        guard.check(bad, 8)


def test_groups_with_variance_keeps_mixed_groups_only():
    gids = torch.tensor([5, 5, 5, 2, 2, 9, 9, 9, 7])
    acc = torch.tensor([1., 0., 1., 0., 0., 1., 1., 1., 1.])
    assert groups_with_variance(gids, acc) == [5]          # 2 all wrong, 9 all right, 7 a single sample
