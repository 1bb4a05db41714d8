"""The GPU training step's parts, checked on the CPU in fp32 with the tiny Qwen3-VL:
gradient checkpointing gives the gradients of no checkpointing (also when the forward ran under
an SDPA kernel choice of its own, the H200 crash); packed micro-batches give the log-probs,
loss and update of padded ones; the on-policy shortcut gives the two-pass update; AdamW is
fused only where it can be."""

from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from prism_rl.actor import on_policy, ppo_update, sequence_logprobs, split_micro
from prism_rl.config import AlgoConfig, ModelConfig, OptimConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.models.loading import load_policy
from prism_rl.models.logprobs import response_logprobs
from prism_rl.models.packing import block_causal_mask, pack_batch, packed_position_ids
from prism_rl.rollout.base import SamplingParams, micro_batch
from prism_rl.rollout.hf import HFEngine
from prism_rl.trainers.optim import build_optimizer, fused_ok

from conftest import png_bytes

CPU = torch.device("cpu")
IMG = 9


def _policy(tiny_model_dir, **model_kw):
    torch.manual_seed(0)
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir), **model_kw), CPU, trainable=True)
    return model, proc


def _rollouts(model, proc):
    """Two image prompts of different lengths and one text-only prompt, 3 samples each, with
    responses cut to mixed lengths (2..12 tokens), so rows are left- and right-padded."""
    recs = [Record(id="0", messages=[{"role": "user", "content": "<image>How many?"}], images=[ImageRef(data=png_bytes("red"))]),
            Record(id="1", messages=[{"role": "user", "content": "<image>What colour is the big shape here, please?"}],
                   images=[ImageRef(data=png_bytes("blue", shape="square"))]),
            Record(id="2", messages=[{"role": "user", "content": "Add the digits of 12345."}])]
    torch.manual_seed(1)
    ro = HFEngine(model, proc).generate([encode_prompt(proc, r) for r in recs], SamplingParams(n=3, max_new_tokens=12))
    for row, keep in enumerate([12, 3, 7, 2, 12, 5, 9, 4, 11]):
        ro.response_mask[row, keep:] = 0
    return ro


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _loss_grads(model, batch, P, mask, packed=False, forward_ctx=None):
    model.zero_grad(set_to_none=True)
    with forward_ctx or nullcontext():
        lp = response_logprobs(model, batch, P, packed=packed, with_entropy=True)
    loss = -(lp[0] * mask).sum() / mask.sum() - 0.1 * (lp[1] * mask).sum() / mask.sum()
    loss.backward()  # outside the forward's context, as in the trainers
    return float(loss.detach()), _grads(model)


def test_gradient_checkpointing_gives_the_gradients_of_none(tiny_model_dir):
    """The backward's recompute runs under the forward's SDPA kernel choice: a forward under
    ``sdpa_kernel([MATH])`` (the trainers' forward-only context, here on the CPU) used to be
    recomputed with another kernel and fail with CheckpointError (metadata differ)."""
    plain, proc = _policy(tiny_model_dir)
    ckpt, _ = _policy(tiny_model_dir, gradient_checkpointing=True)
    ro = _rollouts(plain, proc)
    batch, P, mask = micro_batch(ro, list(range(len(ro))))
    assert bool((batch["attention_mask"][:, 0] == 0).any()) and "pixel_values" in batch  # left padding, images
    for packed in (False, True):
        loss0, g0 = _loss_grads(plain, batch, P, mask, packed, sdpa_kernel([SDPBackend.MATH]))
        loss1, g1 = _loss_grads(ckpt, batch, P, mask, packed, sdpa_kernel([SDPBackend.MATH]))
        assert abs(loss0 - loss1) < 1e-6
        assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4), (packed, (g0 - g1).abs().max())
        assert g0.abs().sum() > 0


def test_packed_position_ids_hand_values():
    # row 0: [pad pad | t t IMG IMG IMG IMG t] with a 2x2 merged image; row 1: [pad | t t t t t t t]
    ids = torch.tensor([[0, 0, 5, 6, IMG, IMG, IMG, IMG, 7], [0, 5, 6, 7, 8, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    pos = packed_position_ids({"input_ids": ids, "attention_mask": mask, "image_grid_thw": torch.tensor([[1, 4, 4]])},
                              IMG, 2)
    assert pos.shape == (4, 1, 15)
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7],
                                  [0, 1, 2, 2, 2, 2, 4, 0, 1, 2, 3, 4, 5, 6, 7],
                                  [0, 1, 2, 2, 3, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7],
                                  [0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]]


def test_block_causal_mask_hand_values():
    seg = torch.tensor([0, 0, 1, 1, 1])
    m = block_causal_mask(seg, "sdpa", torch.float32)[0, 0]
    assert m.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    add = block_causal_mask(seg, "eager", torch.float32)[0, 0]
    assert torch.equal(add == 0, m) and float(add.min()) == torch.finfo(torch.float32).min
    assert block_causal_mask(seg, "flash_attention_2", torch.float32) is None
    with pytest.raises(ValueError, match="packed micro-batches need attn_implementation"):
        block_causal_mask(seg, "flex_attention", torch.float32)


@torch.no_grad()
def test_packed_logprobs_equal_padded_for_sdpa_and_eager(tiny_model_dir):
    for impl in ("sdpa", "eager"):
        model, proc = _policy(tiny_model_dir, attn_implementation=impl)
        ro = _rollouts(model, proc)
        batch, P, mask = micro_batch(ro, list(range(len(ro))))
        pad_lp, pad_ent = response_logprobs(model, batch, P, with_entropy=True)
        pk_lp, pk_ent = response_logprobs(model, batch, P, with_entropy=True, packed=True)
        assert torch.allclose(pad_lp, pk_lp, atol=1e-5) and torch.allclose(pad_ent, pk_ent, atol=1e-5), impl
        assert float(pk_lp[mask == 0].abs().sum()) == 0.0 and float(pk_lp[mask == 1].abs().min()) > 0
        if impl == "sdpa":
            # The text-position row alone marks the rows the way transformers reads packed sequences
            # (its flash_attention_2 varlen path): given no mask, it builds the same block-diagonal one.
            inputs = pack_batch(model, batch)
            ref = model.model(**inputs, use_cache=False).last_hidden_state[0]
            hid = model.model(**(inputs | {"attention_mask": None}), use_cache=False).last_hidden_state[0]
            assert torch.allclose(hid, ref, atol=1e-5)


def test_split_micro_by_rows_and_by_token_budget(tiny_model_dir):
    model, proc = _policy(tiny_model_dir)
    ro = _rollouts(model, proc)
    tokens = (ro.prompt_mask.sum(1) + ro.response_mask.sum(1)).tolist()
    rows = list(range(len(ro)))
    assert split_micro(ro, rows, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    budget = tokens[0] + tokens[1]
    runs = split_micro(ro, rows, 4, token_budget=budget)
    assert [r for run in runs for r in run] == rows
    assert runs[0][:2] == [0, 1]
    for run in runs:
        used = sum(tokens[r] for r in run)
        assert used <= budget or len(run) == 1
    # each run is maximal: the next row would not have fit
    for run, nxt in zip(runs, runs[1:]):
        assert sum(tokens[r] for r in run) + tokens[nxt[0]] > budget
    assert split_micro(ro, rows, 4, token_budget=1) == [[r] for r in rows]


def _update(tiny_model_dir, algo: AlgoConfig, *, two_pass: bool = True, attn: str = "sdpa", kl_coef: float = 0.0):
    """(weights change after one ``ppo_update`` with SGD(lr=1), i.e. minus the gradient; its
    metrics; the token-mean entropy of the weights before the step)."""
    model, proc = _policy(tiny_model_dir, attn_implementation=attn)
    ro = _rollouts(model, proc)
    old_lp_all, ent = sequence_logprobs(model, ro, micro=4, device=CPU, with_entropy=True)
    entropy = float((ent * ro.response_mask).sum() / ro.response_mask.sum())
    old = old_lp_all if two_pass else None
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.7, 1.5])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    ref = old_lp_all - 0.3 * torch.rand(old_lp_all.shape, generator=torch.Generator().manual_seed(0))
    m = ppo_update(model, opt, sched, ro, adv, old, algo, grad_clip=1e9, device=CPU, kl_coef=kl_coef, ref_lp=ref)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before, m, entropy


def test_packed_update_equals_padded_update(tiny_model_dir):
    for agg in ("token-mean", "seq-mean-token-mean"):
        padded, mp, _ = _update(tiny_model_dir, AlgoConfig(micro_batch_size=4, agg=agg, entropy_coef=0.01))
        packed, mk, _ = _update(tiny_model_dir, AlgoConfig(micro_batch_size=4, agg=agg, entropy_coef=0.01,
                                                           micro_token_budget=90))
        assert padded.abs().max() > 0
        assert torch.allclose(packed, padded, atol=1e-6, rtol=1e-4), (agg, (packed - padded).abs().max())
        assert abs(mp["pg_loss"] - mk["pg_loss"]) < 1e-5, agg


def test_kl_and_entropy_terms_do_not_depend_on_the_micro_batch_split(tiny_model_dir):
    """They are token means over the mini-batch whatever the aggregation: under seq-mean they
    used to be weighted by each micro-batch's share of rows, so the update moved with the split."""
    for agg in ("seq-mean-token-mean", "token-mean"):
        kw = dict(agg=agg, entropy_coef=0.5)
        whole, mw, _ = _update(tiny_model_dir, AlgoConfig(micro_batch_size=9, **kw), kl_coef=0.5)
        split, ms, _ = _update(tiny_model_dir, AlgoConfig(micro_batch_size=2, **kw), kl_coef=0.5)
        assert torch.allclose(split, whole, atol=1e-6, rtol=1e-4), (agg, (split - whole).abs().max())
        assert abs(mw["kl"] - ms["kl"]) < 1e-6 and mw["kl"] > 0
        assert abs(mw["pg_loss"] - ms["pg_loss"]) < 1e-5


def test_on_policy_shortcut_gives_the_two_pass_update(tiny_model_dir):
    for budget in (None, 90):
        algo = AlgoConfig(micro_batch_size=4, micro_token_budget=budget)
        assert on_policy(algo)
        two, m2, _ = _update(tiny_model_dir, algo)
        one, m1, entropy = _update(tiny_model_dir, algo, two_pass=False)
        assert two.abs().max() > 0
        assert torch.allclose(one, two, atol=1e-6, rtol=1e-4), (budget, (one - two).abs().max())
        assert m1["ratio_mean"] == 1.0 and m1["clip_frac"] == 0.0
        assert abs(m1["entropy"] - entropy) < 1e-5 and entropy > 0  # what the separate pass reports
        assert "entropy" not in m2


def test_on_policy_shortcut_refuses_several_updates(tiny_model_dir):
    algo = AlgoConfig(mini_batches=2)
    assert not on_policy(algo) and not on_policy(AlgoConfig(ppo_epochs=2))
    with pytest.raises(ValueError, match="one PPO epoch and one mini-batch"):
        _update(tiny_model_dir, algo, two_pass=False)


def test_adamw_is_fused_only_on_the_gpu():
    cpu = [torch.nn.Parameter(torch.ones(3, 3))]
    assert not fused_ok(cpu) and not fused_ok([])
    opt = build_optimizer(cpu, OptimConfig(lr=0.1))
    assert not opt.defaults["fused"]
    cpu[0].grad = torch.ones(3, 3)
    opt.step()
    assert float(cpu[0].detach()[0, 0]) < 1.0
    if torch.cuda.is_available():
        gpu = [torch.nn.Parameter(torch.ones(3, 3, device="cuda"))]
        assert fused_ok(gpu) and build_optimizer(gpu, OptimConfig()).defaults["fused"]
