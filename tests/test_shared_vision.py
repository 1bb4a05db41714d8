"""One vision-tower pass per distinct image (models/shared_vision.py): the copies it finds, and
that log-probs and the PPO update are those of the per-row computation, with less tower work."""

from __future__ import annotations

import pytest
import torch

from prism_rl.actor import ppo_update, sequence_logprobs
from prism_rl.config import AlgoConfig
from prism_rl.models.shared_vision import SharedVision, distinct_images, shared_vision, vision_owner
from test_train_step import CPU, _policy, _rollouts

ADV = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.7, 1.5])


def _patches_seen(model) -> list[int]:
    """Patches of every call of the vision tower, appended as they happen."""
    seen: list[int] = []
    vision_owner(model).visual.register_forward_pre_hook(lambda m, args, kw: seen.append(int(args[0].shape[0])),
                                                         with_kwargs=True)
    return seen


@pytest.fixture
def policy(tiny_model_dir):
    model, proc = _policy(tiny_model_dir)
    return model, _rollouts(model, proc)


def test_distinct_images_finds_the_copies_of_a_group_and_compares_them(policy):
    _, ro = policy          # rows 0-2: prompt 0 (image), 3-5: prompt 1 (image), 6-8: text only
    assert ro.extras["images_per_row"] == [1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert distinct_images(ro, list(range(9))) == ([0, 0, 0, 1, 1, 1], [0, 3])
    assert distinct_images(ro, [5, 0, 4, 7]) == ([0, 1, 0], [5, 0])
    n = ro.extras["patches_per_row"][0]
    ro.pixel_values[n:2 * n] += 1.0         # row 1's image now differs from row 0's: same group id, not shared
    assert distinct_images(ro, list(range(9))) == ([0, 1, 0, 2, 2, 2], [0, 1, 3])


def test_no_sharing_without_copies_or_images(policy):
    model, ro = policy
    assert shared_vision(model, ro, [0, 3, 6], CPU) is None     # one row per image
    assert shared_vision(model, ro, [6, 7, 8], CPU) is None     # text only
    s = shared_vision(model, ro, list(range(9)), CPU)
    assert isinstance(s, SharedVision) and (s.images, s.distinct) == (6, 2)


def test_sequence_logprobs_equal_with_one_tower_pass_per_image(policy):
    model, ro = policy
    seen = _patches_seen(model)
    plain = sequence_logprobs(model, ro, micro=4, device=CPU, share_vision=False)
    per_row = sum(seen)
    seen.clear()
    shared = sequence_logprobs(model, ro, micro=4, device=CPU)
    patches = ro.extras["patches_per_row"]
    assert per_row == sum(patches) and sum(seen) == patches[0] + patches[3]   # 6 images -> 2
    assert plain.abs().sum() > 0
    assert torch.allclose(shared, plain, atol=1e-6), (shared - plain).abs().max()


def _deltas(tiny_model_dir, share: bool, **algo_kw):
    """(every weight's change after one ppo_update with SGD(lr=1), i.e. minus the gradient; the
    vision weights' change; metrics; patches the tower saw)."""
    model, proc = _policy(tiny_model_dir)
    ro = _rollouts(model, proc)
    seen = _patches_seen(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    visual = vision_owner(model).visual
    before = [p.detach().clone() for p in model.parameters()]
    vis_before = torch.cat([p.detach().flatten().clone() for p in visual.parameters()])
    m = ppo_update(model, opt, sched, ro, ADV, None, AlgoConfig(**algo_kw), grad_clip=1e9, device=CPU,
                   share_vision=share)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    vis = torch.cat([p.detach().flatten() for p in visual.parameters()]) - vis_before
    return delta, vis, m, sum(seen), ro.extras["patches_per_row"]


@pytest.mark.parametrize("algo_kw", [dict(micro_batch_size=4), dict(micro_batch_size=2, entropy_coef=0.1),
                                     dict(micro_batch_size=4, micro_token_budget=90)])
def test_ppo_update_equals_the_per_row_update(tiny_model_dir, algo_kw):
    plain, vis_plain, mp, seen_plain, patches = _deltas(tiny_model_dir, False, **algo_kw)
    shared, vis_shared, ms, seen_shared, _ = _deltas(tiny_model_dir, True, **algo_kw)
    assert vis_plain.abs().max() > 0                           # the tower is trained
    assert torch.allclose(vis_shared, vis_plain, atol=1e-6, rtol=1e-4), (vis_shared - vis_plain).abs().max()
    assert torch.allclose(shared, plain, atol=1e-6, rtol=1e-4), (shared - plain).abs().max()
    assert abs(ms["pg_loss"] - mp["pg_loss"]) < 1e-6 and abs(ms["entropy"] - mp["entropy"]) < 1e-6
    assert seen_plain == sum(patches)                          # each image row once (no checkpointing)
    assert seen_shared == 2 * (patches[0] + patches[3])        # features once + the backward's recompute


def test_frozen_tower_is_served_without_a_backward(tiny_model_dir):
    model, proc = _policy(tiny_model_dir, freeze_vision=True)
    ro = _rollouts(model, proc)
    s = shared_vision(model, ro, list(range(9)), CPU)
    assert s is not None and not s.train and not any(t.requires_grad for t in s.levels)


def test_serving_refuses_a_forward_over_other_rows(policy):
    model, ro = policy
    s = shared_vision(model, ro, list(range(9)), CPU)
    from prism_rl.rollout.base import micro_batch
    batch, _, _ = micro_batch(ro, [0, 3])
    with s.serving([0]), pytest.raises(RuntimeError, match="set up for 1 images"):
        model(**batch)


def test_two_images_per_row_are_told_apart_by_position(tiny_model_dir):
    """A prompt with two different images: each position is its own distinct image, shared by
    the group's rows; the update still equals the per-row one."""
    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import ImageRef, Record
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine

    from conftest import png_bytes

    def run(share: bool):
        model, proc = _policy(tiny_model_dir)
        rec = Record(id="0", messages=[{"role": "user", "content": "<image><image>Same colour?"}],
                     images=[ImageRef(data=png_bytes("red")), ImageRef(data=png_bytes("blue", shape="square"))])
        torch.manual_seed(1)
        ro = HFEngine(model, proc).generate([encode_prompt(proc, rec)], SamplingParams(n=3, max_new_tokens=8))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        ppo_update(model, opt, sched, ro, ADV[:3], None, AlgoConfig(micro_batch_size=2), grad_clip=1e9, device=CPU,
                   share_vision=share)
        return ro, torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])

    ro, shared = run(True)
    assert ro.extras["images_per_row"] == [2, 2, 2]
    assert distinct_images(ro, [0, 1, 2]) == ([0, 1, 0, 1, 0, 1], [0, 1])
    _, plain = run(False)
    assert plain.abs().max() > 0
    assert torch.allclose(shared, plain, atol=1e-6, rtol=1e-4), (shared - plain).abs().max()


def test_inconsistent_image_inputs_are_refused(policy):
    _, ro = policy
    ro.extras["patches_per_row"][0] += 4
    with pytest.raises(ValueError, match="image inputs are inconsistent"):
        distinct_images(ro, list(range(9)))


def test_dummy_image_is_one_merged_token_through_the_tower(policy):
    """Under torchrun a rank with fewer distinct images runs this in the others' extra tower calls."""
    model, ro = policy
    s = shared_vision(model, ro, list(range(9)), CPU)
    pix, thw = s._dummy()
    assert pix.shape[1] == ro.pixel_values.shape[1] and thw.tolist() == [[1, 2, 2]]
    from prism_rl.models.shared_vision import _flat
    flat, kind = _flat(s._tower(pix, thw))
    assert [tuple(t.shape) for t in flat] == [(1, t.shape[1]) for t in s.levels] and kind == s.kind
