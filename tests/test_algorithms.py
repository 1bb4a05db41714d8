"""Tests for prism_rl.algorithms: hand-computed values, gradients, and cross-checks with TRL
(GRPOTrainer's own loss code) and transformers (the Qwen3-VL-MoE load-balancing loss)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prism_rl.algorithms import (
    aggregate_loss,
    align_advantages,
    bradley_terry_loss,
    discriminator_loss,
    group_normalize,
    grpo_advantages,
    kl_penalty,
    load_balancing_loss,
    masked_mean,
    masked_sum,
    overlong_penalty,
    policy_loss,
)

EPS = 1e-6
D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    a = torch.as_tensor(a, dtype=D)
    b = torch.as_tensor(b, dtype=D)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


# ----------------------------------------------------------------------------- masked helpers


def test_masked_helpers_values_and_empty_rows():
    x = t([[1.0, 2.0, float("inf")], [float("nan"), 5.0, 6.0], [4.0, 4.0, 4.0]])
    m = t([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    close(masked_sum(x, m), 3.0 + 12.0)
    close(masked_mean(x, m), 15.0 / 5)
    close(masked_sum(x, m, dim=-1), [3.0, 0.0, 12.0])
    close(masked_mean(x, m, dim=-1), [1.5, 0.0, 4.0])  # fully masked row -> 0, not NaN
    close(masked_mean(x, torch.zeros_like(m)), 0.0)


def test_masked_mean_bool_mask_and_gradient_no_nan():
    x = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    m = torch.tensor([[True, False], [False, False]])
    out = masked_mean(x, m, dim=-1).sum()
    out.backward()
    close(x.grad, [[1.0, 0.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------- aggregation

L = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
M = [[1, 1, 0], [1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", (1 + 2 + 4 + 5 + 6) / 5),  # 3.6
        ("seq-mean-token-mean", ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2),  # (1.5 + 5) / 2, empty row excluded
        ("seq-mean-token-sum", ((1 + 2) + (4 + 5 + 6)) / 2),  # 9, empty row excluded
        ("seq-mean-token-sum-norm", 18 / (3 * 3)),  # B * T = 9, empty row counted in B
    ],
)
def test_aggregate_loss_modes(agg, expected):
    close(aggregate_loss(t(L), t(M), agg), expected)


def test_aggregate_loss_norm_len_empty_and_unknown():
    close(aggregate_loss(t(L), t(M), "seq-mean-token-sum-norm", norm_len=6), 18 / (3 * 6))
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = aggregate_loss(t(L), torch.zeros(3, 3), agg)
        assert not torch.isnan(out) and out.item() == 0.0
    with pytest.raises(ValueError, match="seq-mean-bogus"):
        aggregate_loss(t(L), t(M), "seq-mean-bogus")


def test_aggregate_loss_masked_garbage_does_not_leak():
    lm = t([[1.0, float("nan")], [float("inf"), 3.0]]).requires_grad_()
    m = t([[1, 0], [0, 1]])
    out = aggregate_loss(lm, m, "token-mean")
    close(out, 2.0)
    out.backward()
    close(lm.grad, [[0.5, 0.0], [0.0, 0.5]])


# ----------------------------------------------------------------------------- group normalisation


def test_group_normalize_basic():
    # [1, 2, 3]: mean 2, unbiased std 1 -> (x - 2) / (1 + eps)
    close(group_normalize(t([1.0, 2.0, 3.0]), [0, 0, 0]), [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)])
    # [0, 2]: mean 1, unbiased std sqrt(2)
    s2 = math.sqrt(2.0)
    close(group_normalize(t([0.0, 2.0]), [3, 3]), [-1 / (s2 + EPS), 1 / (s2 + EPS)])
    # eps is honoured
    close(group_normalize(t([1.0, 3.0]), [0, 0], eps=0.5), [-1 / (s2 + 0.5), 1 / (s2 + 0.5)])


def test_group_normalize_all_equal_and_singletons():
    out = group_normalize(torch.full((16,), 0.1), torch.zeros(16, dtype=torch.long))
    assert torch.equal(out, torch.zeros(16))  # exactly 0 despite float rounding of the mean
    # group of one: mean 0, std 1 -> x / (1 + eps); Dr. GRPO -> x
    close(group_normalize(t([7.0, -2.0]), [0, 1]), [7 / (1 + EPS), -2 / (1 + EPS)])
    close(group_normalize(t([7.0, -2.0]), [0, 1], norm_by_std=False), [7.0, -2.0])


def test_group_normalize_non_contiguous_ids():
    scores = t([1.0, 10.0, 2.0, 30.0, 4.0, 3.0])
    gids = torch.tensor([5, 2, 5, 2, 9, 5])
    # group 5: [1, 2, 3] -> [-1, 0, 1] / (1 + eps); group 2: [10, 30] mean 20, std sqrt(200)
    s = math.sqrt(200.0)
    expected = [-1 / (1 + EPS), -10 / (s + EPS), 0.0, 10 / (s + EPS), 4 / (1 + EPS), 1 / (1 + EPS)]
    close(group_normalize(scores, gids), expected)
    close(group_normalize(scores, gids.tolist()), expected)  # list of ids
    close(group_normalize(scores, gids, norm_by_std=False), [-1.0, -10.0, 0.0, 10.0, 4.0, 1.0])


def test_group_normalize_dtypes():
    out = group_normalize(torch.tensor([1, 2, 3]), [0, 0, 0])
    assert out.dtype == torch.float32
    close(out.double(), [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)], tol=1e-6)
    assert group_normalize(torch.tensor([1.0, 3.0], dtype=torch.float16), [0, 0]).dtype == torch.float16


def test_grpo_advantages():
    r = t([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    g = [0, 0, 0, 0, 1, 1, 1, 1]
    # group 0: [1, 0, 1, 0] mean 0.5, unbiased std sqrt(1/3); group 1: std 0 -> advantage 0
    s = math.sqrt(1.0 / 3.0)
    a = 0.5 / (s + EPS)
    close(grpo_advantages(r, g), [a, -a, a, -a, 0.0, 0.0, 0.0, 0.0])
    close(grpo_advantages(r, g, norm_by_std=False), [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])


# ----------------------------------------------------------------------------- policy loss


def _logps(ratios, old=-1.3):
    """old = constant, logp = old + log r (so that exp(logp - old) = r)."""
    r = t(ratios)
    return (torch.full_like(r, old) + torch.log(r)).requires_grad_(), torch.full_like(r, old)


def test_policy_loss_token_level_symmetric():
    logp, old = _logps([[1.5, 0.5, 1.1], [1.5, 0.5, 2.0]])
    with torch.no_grad():
        logp[1, 2] = float("nan")  # masked position: must not leak
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = t([1.0, -1.0])
    # row 0 (A=+1): max(-r, -clip(r)) = [-1.2, -0.5, -1.1]; row 1 (A=-1): max(r, clip(r)) = [1.5, 0.8]
    loss, met = policy_loss(logp, old, adv, mask)
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5)  # -0.1
    close(met["clip_frac"], 2 / 5)  # (0,0) high-clipped with A>0, (1,1) low-clipped with A<0
    close(met["ratio_mean"], (1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    close(met["ratio_max"], 1.5)
    close(met["ratio_min"], 0.5)
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    close(met["approx_kl"], (2 * k3(1.5) + 2 * k3(0.5) + k3(1.1)) / 5)
    assert "dual_clip_frac" not in met
    loss.backward()
    # d/dlogp of -A r = -A r on unclipped tokens, 0 on clipped ones; / 5 tokens
    close(logp.grad, [[0.0, -0.5 / 5, -1.1 / 5], [1.5 / 5, 0.0, 0.0]])

    loss2, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    close(loss2, ((-1.2 - 0.5 - 1.1) / 3 + (1.5 + 0.8) / 2) / 2)


def test_policy_loss_asymmetric_clip():
    logp, old = _logps([[1.5, 1.25, 0.5, 0.9]])
    adv = t([[1.0, 1.0, -1.0, -1.0]])  # (B, T) advantages
    mask = torch.ones(1, 4)
    loss, met = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # 1.5 -> clipped at 1.28; 1.25 inside (1.28 high); 0.5 -> 0.8; 0.9 inside
    close(loss, (-1.28 - 1.25 + 0.8 + 0.9) / 4)
    close(met["clip_frac"], 2 / 4)
    # symmetric 0.2 would clip 1.25 to 1.2
    loss_sym, _ = policy_loss(logp, old, adv, mask)
    close(loss_sym, (-1.2 - 1.2 + 0.8 + 0.9) / 4)


def test_policy_loss_dual_clip_negative_advantages():
    logp, old = _logps([[15.0, 1.5, 0.5, 15.0]])
    adv = t([[-2.0, -2.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    # no dual clip: [max(30, 2.4), max(3, 2.4), max(0.5, 0.8), max(-15, -1.2)]
    loss0, met0 = policy_loss(logp, old, adv, mask, clip_high=0.2)
    close(loss0, (30 + 3 + 0.8 - 1.2) / 4)
    # dual clip c = 10, A < 0 only: 30 -> min(30, 20) = 20; the A > 0 token is untouched
    loss, met = policy_loss(logp, old, adv, mask, clip_c=10.0)
    close(loss, (20 + 3 + 0.8 - 1.2) / 4)
    close(met["dual_clip_frac"], 1 / 4)
    close(met["clip_frac"], 2 / 4)  # tokens 2 and 3
    loss.backward()
    # dual-clipped token: constant -A c -> 0 gradient; token 1 unclipped: -A r = 2 * 1.5
    close(logp.grad, [[0.0, 3.0 / 4, 0.0, 0.0]])
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, clip_c=1.0)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(logp, old, adv, mask, ratio_level="tok")


def test_policy_loss_fully_masked_row():
    logp, old = _logps([[1.5, 0.5], [3.0, 3.0], [1.1, 0.9]])
    with torch.no_grad():
        logp[1] = float("-inf")
    adv = t([1.0, 5.0, -1.0])
    mask = t([[1, 1], [0, 0], [1, 0]])
    for level in ("token", "sequence"):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            loss, met = policy_loss(logp, old, adv, mask, ratio_level=level, agg=agg)
            assert torch.isfinite(loss) and all(math.isfinite(v) for v in met.values())
            keep = [0, 2]
            ref, _ = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], ratio_level=level, agg=agg)
            close(loss, ref)
            g = torch.autograd.grad(loss, logp)[0]
            assert torch.isfinite(g).all() and (g[1] == 0).all()
    # token level, token-mean: row 0 [-1.2, -0.5], row 2 [max(1.1, 1.1)] = 1.1 -> mean over 3 tokens
    loss, _ = policy_loss(logp, old, adv, mask)
    close(loss, (-1.2 - 0.5 + 1.1) / 3)
    # nothing valid at all -> 0 and finite metrics
    loss, met = policy_loss(logp, old, adv, torch.zeros(3, 2))
    assert loss.item() == 0.0 and met["ratio_max"] == 0.0 and met["clip_frac"] == 0.0


def test_gspo_values():
    # row 0: d = [log 2, log 0.5] -> mean 0 -> s = 1; row 1: s = 1.0005 (> 1 + 4e-4); row 2: s = 0.999
    logp, old = _logps([[2.0, 0.5, 1.0], [1.0005, 1.0005, 1.0005], [0.999, 0.999, 7.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    adv = t([1.0, 2.0, -1.0])
    loss, met = policy_loss(
        logp, old, adv, mask, ratio_level="sequence", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"
    )
    # row 0: -1 * 1; row 1: -2 * 1.0004 (clipped); row 2: max(0.999, 0.9997) = 0.9997 (clipped)
    close(loss, (-1.0 - 2.0 * 1.0004 + 0.9997) / 3)
    close(met["ratio_max"], 1.0005)
    close(met["ratio_min"], 0.999)
    close(met["clip_frac"], 5 / 7)  # every token of rows 1 and 2
    close(met["ratio_mean"], (2 * 1.0 + 3 * 1.0005 + 2 * 0.999) / 7)
    loss.backward()
    # row 0 unclipped: d/dlogp_t of -A s = -s / n_0 per token, then / 3 sequences; rows 1, 2 clipped -> 0
    close(logp.grad, [[-1 / 2 / 3, -1 / 2 / 3, 0.0], [0, 0, 0], [0, 0, 0]])


def test_gspo_stop_gradient_form_matches_sequence_objective():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 3).requires_grad_()
    old = (logp.detach() + 0.08 * torch.randn(B, T, generator=g, dtype=D))
    lengths = torch.tensor([7, 5, 1, 3, 0, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    adv = torch.tensor([1.0, -1.5, 0.7, -0.3, 2.0, 0.4], dtype=D)
    cl, ch = 0.02, 0.03
    loss, _ = policy_loss(
        logp, old, adv, mask, ratio_level="sequence", clip_low=cl, clip_high=ch, agg="seq-mean-token-mean"
    )
    (grad,) = torch.autograd.grad(loss, logp)

    # direct sequence-level objective
    logp2 = logp.detach().clone().requires_grad_()
    seq = []
    for i in range(B):
        n = int(lengths[i])
        if n == 0:
            continue
        s = torch.exp((logp2[i, :n] - old[i, :n]).mean())
        seq.append(torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - cl, 1 + ch)))
    direct = torch.stack(seq).mean()
    (grad2,) = torch.autograd.grad(direct, logp2)
    close(loss, direct, tol=1e-12)
    close(grad, grad2, tol=1e-12)
    s_all = torch.exp(masked_mean(logp.detach() - old, mask, dim=-1))[lengths > 0]
    clipped = (s_all < 1 - cl) | (s_all > 1 + ch)
    assert clipped.any() and (~clipped).any()  # both branches exercised
    assert (grad2[lengths == 0] == 0).all()


# ----------------------------------------------------------------------------- KL


def test_kl_penalty():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_penalty(logp, ref, "k1"), [math.log(2.0)])
    close(kl_penalty(logp, ref, "k2"), [0.5 * math.log(2.0) ** 2])
    # ref - logp = -log 2: exp = 0.5 -> 0.5 + log 2 - 1
    close(kl_penalty(logp, ref), [0.5 + math.log(2.0) - 1])
    close(kl_penalty(logp, ref, "k3"), [0.5 + math.log(2.0) - 1])
    close(kl_penalty(t([0.0, 0.0]), t([-30.0, 30.0])), [10.0, 10.0])  # clamped to [-10, 10]
    close(kl_penalty(t([0.0]), t([-5.0])), [math.exp(-5.0) + 5.0 - 1.0])  # 4.0067, under the clamp
    close(kl_penalty(t([-1.0]), t([-1.0])), [0.0])
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


# ----------------------------------------------------------------------------- overlong


def test_overlong_penalty():
    # L_max 8192, L_buf 4096 (METHOD.md section 7): free up to 4096, -0.5 at 6144, -1 at 8192, -1.5 at 10240
    out = overlong_penalty(torch.tensor([0, 4096, 4097, 6144, 8192, 10240]), 8192, 4096)
    close(out.double(), [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.5])
    close(overlong_penalty([6, 7, 9, 10], 10, 4, factor=0.5).double(), [0.0, -0.125, -0.375, -0.5])
    with pytest.raises(ValueError):
        overlong_penalty([1], 10, 0)


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_loss():
    sp, sn = t([2.0, 0.0, 1000.0, -1000.0]), t([0.0, 0.0, 0.0, 0.0])
    l2 = math.log(1 + math.exp(-2.0))  # -log sigmoid(2) = 0.126928
    close(bradley_terry_loss(sp, sn), (l2 + math.log(2.0) + 0.0 + 1000.0) / 4)  # stable at +-1000
    close(bradley_terry_loss(sp, sn, t([1, 1, 0, 0])), (l2 + math.log(2.0)) / 2)
    close(bradley_terry_loss(sp, sn, torch.zeros(4)), 0.0)
    sp = t([0.0]).requires_grad_()
    bradley_terry_loss(sp, t([0.0])).backward()
    close(sp.grad, [-0.5])  # -(1 - sigmoid(0))


# ----------------------------------------------------------------------------- load balancing


def test_load_balancing_loss_hand_values():
    p = t([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]])
    m = t([1, 1, 0])  # third token masked
    # top-1: f = [0.5, 0.5, 0, 0], P = [0.4, 0.4, 0.2, 0] -> 4 * (0.2 + 0.2) = 1.6
    close(load_balancing_loss(p, 1, 4, m, inputs_are_logits=False), 1.6)
    # top-2: token 1 -> {0, 1}, token 2 -> {1, 2}: f = [0.5, 1, 0.5, 0] -> 4 * (0.2 + 0.4 + 0.1) = 2.8
    close(load_balancing_loss(p, 2, 4, m, inputs_are_logits=False), 2.8, tol=1e-6)
    # uniform routing: E * sum_e (k/E)(1/E) = k (HF convention)
    close(load_balancing_loss(torch.zeros(8, 4), 2, 4), 2.0, tol=1e-6)
    close(load_balancing_loss(p, 1, 4, torch.zeros(3), inputs_are_logits=False), 0.0)


def test_load_balancing_loss_matches_transformers_qwen3_vl_moe():
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(3)
    B, T, E, k = 3, 5, 4, 2
    layers = tuple(torch.randn(B * T, E, generator=g) for _ in range(3))
    att = (torch.arange(T)[None] < torch.tensor([5, 2, 4])[:, None]).long()
    ref = load_balancing_loss_func(layers, E, k, att)
    close(load_balancing_loss(layers, k, E, att).double(), ref.double(), tol=1e-6)
    ref = load_balancing_loss_func(layers, E, k, None)
    close(load_balancing_loss(layers, k, E).double(), ref.double(), tol=1e-6)


# ----------------------------------------------------------------------------- PRISM alignment


def test_align_advantages_mixed_group():
    # group 0 (ids 7): cap [3, 2, inv] -> fill min(3, 2) - 1 = 1 -> [3, 2, 1] -> GN [1, 0, -1]
    #                  reason [1, 2, inv] -> fill 0 -> [1, 2, 0] -> GN [0, 1, -1]
    # the invalid rollout's raw scores (100, -100) are ignored.
    cap = t([3.0, 2.0, 100.0])
    rea = t([1.0, 2.0, -100.0])
    valid = torch.tensor([True, True, False])
    adv, info = align_advantages(cap, rea, valid, [7, 7, 7])
    c = 1 / (1 + EPS)
    close(info["cap_filled"], [3.0, 2.0, 1.0])
    close(info["reason_filled"], [1.0, 2.0, 0.0])
    close(adv, [0.5 * c, 0.5 * c, -c - 1.5])
    adv, _ = align_advantages(cap, rea, valid, [7, 7, 7], alpha=0.3, format_penalty=2.0)
    close(adv, [0.3 * c, 0.7 * c, -c - 2.0])


def test_align_advantages_all_invalid_singletons_and_interleaved_groups():
    # interleaved groups: g=4 all invalid (3 rollouts), g=1 single invalid, g=2 single valid,
    # g=0 the mixed group of the previous test
    gids = torch.tensor([4, 0, 1, 4, 0, 2, 0, 4])
    cap = t([5.0, 3.0, 9.0, 0.0, 2.0, 2.0, 0.0, -3.0])
    rea = t([5.0, 1.0, 9.0, 0.0, 2.0, 4.0, 0.0, -3.0])
    valid = t([0, 1, 0, 0, 1, 1, 0, 0])
    adv, info = align_advantages(cap, rea, valid, gids)
    c = 1 / (1 + EPS)
    expected = [
        -1.5,  # all-invalid group: all scores -1 -> GN 0 -> -format_penalty
        0.5 * c,
        -c - 1.5,  # single invalid: score -1, GN = -1 / (1 + eps)
        -1.5,
        0.5 * c,
        (0.5 * 2 + 0.5 * 4) * c,  # single valid: GN = x / (1 + eps)
        -c - 1.5,
        -1.5,
    ]
    close(adv, expected)
    close(info["cap_filled"], [-1.0, 3.0, -1.0, -1.0, 2.0, 2.0, 1.0, -1.0])
    assert int(info["all_invalid_groups"]) == 2  # groups 4 and 1
    close(info["invalid_frac"], 5 / 8, tol=1e-6)


# ----------------------------------------------------------------------------- discriminator loss


def test_discriminator_loss():
    t_cap = t([2.0, 0.0, 5.0]).requires_grad_()
    s_cap = t([0.0, 0.0, 0.0])          # row 2 is format-invalid: the reward step scored it 0
    t_rea = t([1.0, 3.0, 2.0])
    s_rea = t([1.0, 1.0, 0.0])
    valid = t([1, 1, 0])
    loss, met = discriminator_loss(t_cap, s_cap, t_rea, s_rea, valid)
    l2 = math.log(1 + math.exp(-2.0))
    bt = (l2 + math.log(2.0)) / 2  # both segments: gaps {2, 0} over the valid rows
    # squared scores of every row: (4 + 0 + 25) T_cap + 0 S_cap + (1 + 9 + 4) T_r + (1 + 1 + 0) S_r = 45, / 12
    close(loss, bt + bt + 0.001 * 45 / 12)
    close(met["reg"], 45 / 12)
    close(met["cap_acc"], 0.5)
    close(met["reason_acc"], 0.5)
    close(met["cap_gap"], 1.0)
    close(met["reason_gap"], 1.0)
    close(met["bt_cap"], bt)
    assert met["num_valid"] == 2.0
    loss.backward()
    # d/dT_cap_i = -(1 - sigmoid(gap_i)) / |V| [i valid] + 0.001 * 2 T_cap_i / 12
    sig2 = 1 / (1 + math.exp(-2.0))
    close(t_cap.grad, [-(1 - sig2) / 2 + 0.001 * 4 / 12, -0.5 / 2, 0.001 * 10 / 12])
    loss, _ = discriminator_loss(t_cap, s_cap, t_rea, s_rea, valid, reg_coef=0.1)
    close(loss, 2 * bt + 0.1 * 45 / 12)
    # no valid rollout: the BT terms vanish, the regulariser still bounds the teacher's scores
    loss, met = discriminator_loss(t_cap, s_cap, t_rea, s_rea, torch.zeros(3))
    close(loss, 0.001 * 45 / 12)
    assert met["cap_acc"] == 0.0 and met["bt_cap"] == 0.0


def test_discriminator_loss_group_by_group_sums_to_the_step_loss():
    g = torch.Generator().manual_seed(0)
    tc, sc, tr, sr = (torch.randn(6, generator=g, dtype=D) for _ in range(4))
    valid = t([1, 0, 1, 1, 0, 0]).bool()
    sc, sr = sc * valid, sr * valid
    full, _ = discriminator_loss(tc, sc, tr, sr, valid, reg_coef=0.5)
    parts = sum(discriminator_loss(tc[r], sc[r], tr[r], sr[r], valid[r], reg_coef=0.5, num_valid=3, num_rows=6)[0]
                for r in (slice(0, 3), slice(3, 6)))
    close(parts, float(full))


# ----------------------------------------------------------------------------- TRL cross-checks


@pytest.fixture(scope="module")
def trl_grpo():
    mod = pytest.importorskip("trl.trainer.grpo_trainer")
    from trl.trainer.utils import nanstd

    return mod.GRPOTrainer, nanstd


def test_trl_group_advantages(trl_grpo):
    """TRL computes advantages inline in GRPOTrainer._generate_and_score_completions (needs a
    model and generation), so this replays its lines ("sum_then_normalize", scale_rewards=
    "group" / "none") with TRL's own ``nanstd`` (unbiased) and its eps 1e-4."""
    _, nanstd = trl_grpo
    g = torch.Generator().manual_seed(1)
    G, P = 8, 5
    rewards = torch.randint(0, 3, (P * G,), generator=g).float() / 2
    rewards[:G] = 0.5  # one zero-variance group
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    trl_adv = (rewards - mean) / (std + 1e-4)
    gids = torch.arange(P * G) // G
    close(grpo_advantages(rewards, gids, eps=1e-4), trl_adv, tol=1e-6)
    close(grpo_advantages(rewards, gids, norm_by_std=False), rewards - mean, tol=1e-6)
    # shuffled rows with their group ids: same per-row result
    perm = torch.randperm(P * G, generator=g)
    close(grpo_advantages(rewards[perm], gids[perm], eps=1e-4), trl_adv[perm], tol=1e-6)


def _trl_loss(
    GRPOTrainer, logp, old, adv, mask, *, loss_type, level="token", eps_low=0.2, eps_high=0.2, delta=None
):
    """Run TRL's real ``GRPOTrainer._compute_loss`` on a stub trainer whose per-token
    log-prob function returns ``logp`` (no model); returns (loss, metrics)."""
    B, T = logp.shape
    metrics = defaultdict(lambda: defaultdict(list))
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp.detach()), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(delta=delta, steps_per_generation=1, use_bias_correction_kl=False),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=metrics,
        accelerator=SimpleNamespace(
            gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
            num_processes=1, sync_gradients=True,
        ),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, metrics["train"]


def _random_batch(seed, B=6, T=9, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 4).requires_grad_()
    old = logp.detach() + scale * torch.randn(B, T, generator=g, dtype=D)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # no empty rows (TRL counts them in "grpo")
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    adv = torch.randn(B, generator=g, dtype=D)
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "loss_type, agg, kw, trl_kw",
    [
        ("bnpo", "token-mean", {}, {}),  # GRPO preset in PRISM / verl sense: token-mean
        ("grpo", "seq-mean-token-mean", {}, {}),  # TRL's "grpo" = per-sequence token mean
        ("dr_grpo", "seq-mean-token-sum-norm", {}, {}),  # / (B * max_completion_length)
        ("luspo", "seq-mean-token-sum", {}, {}),
        # DAPO: asymmetric clip + dual clip. TRL's `delta` (upper clamp of the unclipped ratio) equals
        # the dual clip for A < 0 and is inert for A > 0 when delta >= 1 + eps_high.
        ("dapo", "token-mean", {"clip_high": 0.28, "clip_c": 10.0}, {"eps_high": 0.28, "delta": 10.0}),
    ],
)
def test_trl_token_level_losses(trl_grpo, loss_type, agg, kw, trl_kw):
    GRPOTrainer, _ = trl_grpo
    scale = 1.5 if loss_type == "dapo" else 0.3  # large log-ratios so the dual clip is exercised
    logp, old, adv, mask = _random_batch(11, scale=scale)
    loss, met = policy_loss(logp, old, adv, mask, agg=agg, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    trl_loss, trl_met = _trl_loss(GRPOTrainer, logp2, old, adv, mask, loss_type=loss_type, **trl_kw)
    (trl_grad,) = torch.autograd.grad(trl_loss, logp2)
    close(loss, trl_loss, tol=1e-10)
    close(grad, trl_grad, tol=1e-10)
    close(met["clip_frac"], trl_met["clip_ratio/region_mean"][0], tol=1e-6)
    assert 0 < met["clip_frac"] < 1
    if "clip_c" in kw:
        assert met["dual_clip_frac"] > 0


def test_trl_gspo_loss(trl_grpo):
    GRPOTrainer, _ = trl_grpo
    logp, old, adv, mask = _random_batch(3, B=8, T=10, scale=0.002)
    kw = dict(clip_low=3e-4, clip_high=4e-4)
    loss, met = policy_loss(logp, old, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean", **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    trl_loss, _ = _trl_loss(
        GRPOTrainer, logp2, old, adv, mask, loss_type="grpo", level="sequence", eps_low=3e-4, eps_high=4e-4
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, logp2)
    close(loss, trl_loss, tol=1e-12)
    close(grad, trl_grad, tol=1e-12)
    assert 0 < met["clip_frac"] < 1  # both clipped and unclipped sequences
