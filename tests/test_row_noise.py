"""Per-row seeded sampling (``rollout/noise.py``, ``rollout.per_row_seeds``): the hash is
exact 32-bit arithmetic, each row's noise is its own, the Gumbel-max draw has the softmax's
law, and the HF engine samples a prompt's responses the same alone or batched with others."""

from __future__ import annotations

import random

import torch

from prism_rl.rollout.noise import gumbel, mix32, mul32, row_key, top_p_filter


def _mix32_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_is_exact_32_bit_arithmetic_on_ints_and_tensors():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFFFFFF, *(rng.getrandbits(32) for _ in range(200))]
    assert [mul32(x, 0x846CA68B) for x in xs] == [(x * 0x846CA68B) & 0xFFFFFFFF for x in xs]
    assert [mix32(x) for x in xs] == [_mix32_ref(x) for x in xs]
    assert mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_mix32_ref(x) for x in xs]
    assert mix32(1) != mix32(2) and row_key(1, 0, 0) != row_key(1, 0, 1) != row_key(1, 1, 0)


def test_each_rows_noise_depends_on_its_key_position_and_token_only():
    keys = torch.tensor([row_key(7, k, j) for k in range(3) for j in range(2)], dtype=torch.int64)
    g = gumbel(keys, position=5, vocab=50)
    assert torch.equal(gumbel(keys[[4, 1]], 5, 50), g[[4, 1]])     # another batch: the same rows' noise
    assert not torch.equal(gumbel(keys, 6, 50), g)                  # the next position draws afresh
    assert torch.isfinite(g).all() and g.std() > 0.5


def test_gumbel_max_draws_from_the_softmax():
    """argmax(z + G) over 40,000 keys: token frequencies match softmax(z) within 0.01."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    keys = torch.arange(40_000, dtype=torch.int64) * 2654435761 % 2**32
    picks = (z + gumbel(keys, 0, 5)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / len(keys)
    assert torch.allclose(freq, torch.softmax(z.double(), -1), atol=0.01), freq
    assert freq[4] == 0


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(z, 0.7))
    assert kept.tolist() == [[True, True, False, False]]             # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(top_p_filter(z, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(z, 1.0), z)


def test_hf_engine_samples_a_prompt_the_same_alone_or_batched(tiny_model_dir):
    from prism_rl.config import ModelConfig
    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import Record
    from prism_rl.models.loading import load_policy
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine

    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    engine = HFEngine(model, proc)
    prompts = [encode_prompt(proc, Record(id=str(i), messages=[{"role": "user", "content": t}]))
               for i, t in enumerate(["Add the digits of 12345, then explain.", "Name a prime."])]
    params = dict(n=3, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11)
    both = engine.generate(prompts, SamplingParams(**params))
    torch.manual_seed(123)                                   # the global RNG plays no part
    alone = engine.generate(prompts[1:], SamplingParams(**params, prompt_keys=[1]))
    tokens = lambda ro, rows: [ro.response_ids[r][ro.response_mask[r].bool()].tolist() for r in rows]  # noqa: E731
    assert tokens(both, [3, 4, 5]) == tokens(alone, [0, 1, 2])
    assert len({tuple(t) for t in tokens(both, range(6))}) > 2   # samples differ from one another
    other = engine.generate(prompts[1:], SamplingParams(**{**params, "seed": 12}, prompt_keys=[1]))
    assert tokens(other, [0, 1, 2]) != tokens(alone, [0, 1, 2])
