"""The graph rollout engine against transformers' generate, on the tiny model in fp32 (CPU):
greedy tokens equal, EOS mid-batch and compaction, one shared prefill per prompt, seeded
sampling, and sampled log-probs equal to a teacher-forced forward."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from prism_rl.actor import sequence_logprobs
from prism_rl.config import ModelConfig
from prism_rl.models.loading import load_policy
from prism_rl.rollout import make_engine
from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.graph import GraphEngine, NonfiniteLogits, batch_buckets
from prism_rl.rollout.hf import HFEngine

from conftest import mixed_prompts


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny policy with its text weights redrawn at std 0.3: the untrained one repeats one
    token, which would let a wrong cache or position go unseen; these weights make every
    token depend on its context."""
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim >= 2 and "visual" not in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    return model, proc


@pytest.fixture(scope="module")
def prompts(policy):
    """Mixed prompt lengths, images of two sizes, and one text-only prompt."""
    _, proc = policy
    return mixed_prompts(proc, 3)


def _both(policy, prompts, params, eos=None, **kw):
    model, proc = policy
    hf, graph = HFEngine(model, proc), GraphEngine(model, proc, **kw)
    if eos is not None:
        hf.eos_id = graph.eos_id = eos
    return hf.generate(prompts, params), graph.generate(prompts, params)


def test_greedy_tokens_and_logprobs_equal_generate(policy, prompts):
    params = SamplingParams(n=2, max_new_tokens=24, temperature=0.0, return_logprobs=True)
    a, b = _both(policy, prompts, params)
    assert len({tuple(r.tolist()) for r in a.response_ids}) >= 4            # prompts get different answers
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and a.texts == b.texts
    assert (a.logprobs - b.logprobs).abs().max() < 1e-4


def test_eos_mid_batch_and_compaction(policy, prompts):
    """Stop on a token the rows emit at different steps; compaction every 2 steps moves the
    running rows to the front of smaller buckets, and nothing changes."""
    params = SamplingParams(n=3, max_new_tokens=30, temperature=0.0)
    free, _ = _both(policy, prompts, params)
    eos = int(free.response_ids[0, 4])                # a token row 0 emits at step 4
    a, b = _both(policy, prompts, params, eos=eos, check_every=2)
    lengths = a.response_mask.sum(1)
    assert lengths.min() < lengths.max()               # rows really end at different steps
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.finish_reasons == b.finish_reasons and "stop" in b.finish_reasons


def test_one_prefill_for_n_samples_equals_n_prefills(policy, prompts):
    model, proc = policy
    engine = GraphEngine(model, proc)
    shared = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, temperature=0.0))
    apart = engine.generate([p for p in prompts for _ in range(3)], SamplingParams(n=1, max_new_tokens=12,
                                                                                  temperature=0.0))
    assert torch.equal(shared.response_ids, apart.response_ids)


def test_seeded_sampling_repeats_and_logprobs_match_teacher_forcing(policy, prompts):
    model, proc = policy
    engine = make_engine("graph", model, proc)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, top_p=1.0, return_logprobs=True)
    torch.manual_seed(3)
    a = engine.generate(prompts, params)
    torch.manual_seed(3)
    b = engine.generate(prompts, params)
    assert torch.equal(a.response_ids, b.response_ids)
    assert len({tuple(r.tolist()) for r in a.response_ids[:4]}) > 1     # samples of one prompt differ
    forced = sequence_logprobs(model, a, 8, torch.device("cpu"), temperature=1.0)
    assert (forced - a.logprobs).abs().max() < 1e-4


def test_top_p_keeps_the_nucleus(policy, prompts):
    model, proc = policy
    torch.manual_seed(0)
    ro = GraphEngine(model, proc).generate(prompts[:1], SamplingParams(n=8, max_new_tokens=6, temperature=1.0,
                                                                       top_p=1e-6))
    assert torch.equal(ro.response_ids, ro.response_ids[:1].expand_as(ro.response_ids))   # top_p -> 0 is greedy


def test_make_engine_names_and_buckets(policy):
    model, proc = policy
    assert isinstance(make_engine("auto", model, proc), HFEngine)          # CPU: the reference engine
    assert isinstance(make_engine("graph", model, proc), GraphEngine)
    with pytest.raises(ValueError, match="rollout engine must be one of"):
        make_engine("vllm", model, proc)
    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1]


def test_a_bf16_decode_copy_follows_the_policy_weights(tiny_model_dir, prompts):
    """The decode-dtype copy is refreshed at every generate: after an update, a long-lived
    engine samples what a fresh one does."""
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    old = GraphEngine(model, proc, decode_dtype=torch.bfloat16)
    params = SamplingParams(n=1, max_new_tokens=8, temperature=0.0)
    before = old.generate(prompts, params)
    assert old.shadow is not None and old.shadow.head.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim >= 2 and "visual" not in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    after = old.generate(prompts, params)
    fresh = GraphEngine(model, proc, decode_dtype=torch.bfloat16).generate(prompts, params)
    assert torch.equal(after.response_ids, fresh.response_ids)
    assert not torch.equal(after.response_ids, before.response_ids)


def test_a_batch_over_the_memory_budget_runs_in_waves(policy, prompts):
    """Rows beyond the KV budget are generated in waves; the result equals one wave's."""
    model, proc = policy
    params = SamplingParams(n=2, max_new_tokens=10, temperature=0.0)
    whole = GraphEngine(model, proc).generate(prompts, params)
    small = GraphEngine(model, proc)
    small.kv_budget_bytes = 2 * params.n * small.row_bytes(prompts, params)     # two prompts a wave
    assert small.prompts_per_wave(prompts, params) == 2
    waves = small.generate(prompts, params, group_offset=5)
    assert torch.equal(waves.response_ids, whole.response_ids) and waves.texts == whole.texts
    assert waves.group_ids.tolist() == [5, 5, 6, 6, 7, 7, 8, 8]
    small.kv_budget_bytes = small.row_bytes(prompts, params)                      # not even one prompt
    with pytest.raises(RuntimeError, match="over the engine's budget"):
        small.generate(prompts, params)


def test_a_smaller_call_reuses_the_buffers_and_gives_a_fresh_engines_tokens(policy, prompts):
    """A server's batches vary in size: a call that fits the buffers of an earlier, larger one
    steps in their first slots (no new buffers, so no new CUDA graphs on a GPU) and samples
    what a fresh engine samples; a larger call gets new buffers."""
    model, proc = policy
    params = SamplingParams(n=2, max_new_tokens=12, temperature=0.0, return_logprobs=True)
    engine = GraphEngine(model, proc)
    engine.generate(prompts, params)
    big = engine.state
    small = engine.generate(prompts[1:3], params)
    assert engine.state is big
    fresh = GraphEngine(model, proc).generate(prompts[1:3], params)
    assert torch.equal(small.response_ids, fresh.response_ids)
    assert (small.logprobs - fresh.logprobs).abs().max() < 1e-5
    engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, temperature=0.0))
    assert engine.state is not big and engine.state.rows == 3 * len(prompts)


def test_per_row_seeded_samples_equal_the_hf_engines_in_any_batch_or_wave(policy, prompts):
    """``SamplingParams(seed=...)`` (``rollout.per_row_seeds``): each response is the Gumbel-max
    draw keyed by (seed, its prompt's key, its sample number), the same function in both
    engines, so the graph engine samples the hf engine's responses token for token (fp32, CPU),
    and the same ones for a prompt alone, batched with others, or in a later wave."""
    model, proc = policy
    params = SamplingParams(n=3, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7, return_logprobs=True)
    hf = HFEngine(model, proc).generate(prompts, params)
    graph = GraphEngine(model, proc).generate(prompts, params)
    assert torch.equal(hf.response_ids, graph.response_ids) and torch.equal(hf.response_mask, graph.response_mask)
    assert (hf.logprobs - graph.logprobs).abs().max() < 1e-4
    assert len({tuple(r.tolist()) for r in graph.response_ids}) > 4          # samples differ from one another
    one_row = GraphEngine(model, proc).row_bytes(prompts, params) * params.n
    torch.manual_seed(99)                                                   # the global RNG plays no part
    waves = GraphEngine(model, proc, kv_budget_bytes=one_row).generate(prompts, params)   # one prompt per wave
    assert torch.equal(waves.response_ids, graph.response_ids)
    alone = GraphEngine(model, proc).generate(prompts[2:3], replace(params, prompt_keys=[2]))
    assert torch.equal(alone.response_ids[:, :graph.response_ids.shape[1]], graph.response_ids[6:9, :alone.response_ids.shape[1]])


def test_packed_prefill_is_one_forward_with_each_prompts_own_cache(policy, prompts):
    """Prompts (mixed lengths, images of two sizes, a text-only one) prefilled packed in one
    forward leave the cache, positions and first logits that one forward per prompt leaves
    (fp32, 1e-5), and the rollouts are the same tokens; a token budget splits the packs."""
    model, proc = policy
    params = SamplingParams(n=2, max_new_tokens=12, temperature=0.0, return_logprobs=True)
    forwards = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: forwards.append(k["inputs_embeds"].shape[1]),
                                                                with_kwargs=True)
    try:
        runs = {}
        for budget in (1, 10_000):
            eng = GraphEngine(model, proc, prefill_tokens=budget)
            forwards.clear()
            eng._state_for(len(prompts) * 2, 512)
            first = eng._prefill(prompts, 2)
            st = eng.state
            state = {"keys": [k.clone() for k in st.keys], "values": [v.clone() for v in st.values],
                     "cache_pos": st.cache_pos.clone(), "rope_pos": st.rope_pos.clone()}
            runs[budget] = (first, state, list(forwards), eng.generate(prompts, params))
    finally:
        hook.remove()
    (f1, s1, fw1, r1), (fp, sp, fwp, rp) = runs[1], runs[10_000]
    lengths = [len(p) for p in prompts]
    assert fw1 == lengths and fwp == [sum(lengths)]            # one forward per prompt vs one packed forward
    assert (f1 - fp).abs().max() < 1e-5
    assert torch.equal(s1["cache_pos"], sp["cache_pos"]) and torch.equal(s1["rope_pos"], sp["rope_pos"])
    assert s1["cache_pos"][::2].tolist() == lengths and len(set(s1["rope_pos"].tolist())) == len(prompts)
    for k1, kp, v1, vp in zip(s1["keys"], sp["keys"], s1["values"], sp["values"]):
        assert k1.abs().max() > 0 and (k1 - kp).abs().max() < 1e-5 and (v1 - vp).abs().max() < 1e-5
    assert torch.equal(r1.response_ids, rp.response_ids) and (r1.logprobs - rp.logprobs).abs().max() < 1e-5
    budget = lengths[0] + lengths[1]   # the first two fill a pack; the rest go in packs within it
    groups = GraphEngine(model, proc, prefill_tokens=budget)._prefill_groups(prompts)
    assert groups[0] == [0, 1] and sum(groups, []) == list(range(len(prompts)))
    assert all(len(g) == 1 or sum(lengths[i] for i in g) <= budget for g in groups)
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > budget for a, b in zip(groups, groups[1:]))


def _poisoned(policy, token: int):
    """A copy of the policy whose embedding row ``token`` is NaN: any forward that reads that
    token goes non-finite from there on."""
    model, proc = policy
    bad = copy.deepcopy(model)
    head = bad.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())   # untied: only the input row is NaN
    with torch.no_grad():
        bad.model.language_model.embed_tokens.weight[token] = float("nan")
    return bad, proc


def _only_in(prompts, i: int) -> int:
    """A text token of prompt ``i`` that no other prompt holds."""
    others = set().union(*(set(p.input_ids.tolist()) for j, p in enumerate(prompts) if j != i))
    return next(t for t in prompts[i].input_ids.tolist() if t not in others)


def test_nan_prefill_logits_raise_naming_the_record(policy, prompts):
    """A prompt whose forward is NaN stops the call with the record named (NaN logits would
    otherwise argmax to token 0 every step: an empty response, read as a wrong answer). Alone it
    stays NaN, and the embedding row shows up as a non-finite parameter."""
    model, proc = _poisoned(policy, _only_in(prompts, len(prompts) - 1))    # the text-only prompt "t"
    # one forward per prompt, packed, and packed under bf16 autocast (the GPU's decode dtype)
    for budget, dtype in ((1, None), (10_000, None), (10_000, torch.bfloat16)):
        with pytest.raises(NonfiniteLogits) as err:
            GraphEngine(model, proc, prefill_tokens=budget, decode_dtype=dtype).generate(
                prompts, SamplingParams(n=2, max_new_tokens=4, temperature=0.0))
        msg = str(err.value)
        assert "records" in msg and "t" in msg.split("records ")[1].split(")")[0].split(", ")
        assert "stay non-finite prefilled alone" in msg and "embed_tokens.weight" in msg
        assert ("(the first also in float32)" in msg) == (dtype is not None)   # NaN in fp32 too: not an overflow


def test_a_pack_spreading_one_prompts_nan_is_diagnosed_as_such(policy, prompts):
    """Packed with four clean prompts ahead of it, a NaN prompt spoils the whole pack (masked
    attention still multiplies its NaN values by zero weights); the four named records are
    finite when prefilled alone, and the message says the pack spread it."""
    wave = prompts[:3] + [prompts[0]] + [prompts[-1]]           # the NaN prompt fifth
    model, proc = _poisoned(policy, _only_in(prompts, len(prompts) - 1))
    with pytest.raises(NonfiniteLogits) as err:
        GraphEngine(model, proc, prefill_tokens=10_000).generate(wave, SamplingParams(n=1, max_new_tokens=4,
                                                                                      temperature=0.0))
    msg = str(err.value)
    assert "for 5 of the wave's 5 prompts" in msg and "and 1 more" in msg
    assert "each is finite prefilled alone: the packed prefill spread" in msg


def test_nan_decode_logits_raise_at_the_next_sync(policy, prompts):
    """A token the policy generates (and no prompt holds) made NaN: the prefill is finite, the
    step after it is sampled is not, and the check at the next sync names the step and record."""
    clean = GraphEngine(*policy).generate(prompts[:1], SamplingParams(n=1, max_new_tokens=1, temperature=0.0))
    token = int(clean.response_ids[0, 0])
    assert all(token not in p.input_ids.tolist() for p in prompts[:1])
    model, proc = _poisoned(policy, token)
    with pytest.raises(NonfiniteLogits, match=r"decode step 1 for 1 of 1 running rows \(records 0\)"):
        GraphEngine(model, proc, check_every=1).generate(prompts[:1], SamplingParams(n=1, max_new_tokens=6,
                                                                                     temperature=0.0))


def test_the_hf_engine_stops_on_nan_logits_too(policy, prompts):
    """transformers' generate would argmax NaN to token 0 (greedy) or fail inside multinomial
    (sampled); the reference engine raises NonfiniteLogits naming the record instead, in both."""
    model, proc = _poisoned(policy, _only_in(prompts, len(prompts) - 1))
    for params in (SamplingParams(n=2, max_new_tokens=4, temperature=0.0),
                   SamplingParams(n=2, max_new_tokens=4, temperature=1.0)):
        with pytest.raises(NonfiniteLogits, match=r"decode step 0 for 2 of 8 rows in transformers' generate "
                                                  r"\(records t, t\)"):
            HFEngine(model, proc).generate(prompts, params)
    clean = HFEngine(*policy).generate(prompts, SamplingParams(n=1, max_new_tokens=4, temperature=0.0))
    assert clean.response_ids.shape[0] == len(prompts)      # a finite policy passes through unchanged


def test_a_wave_whose_rows_all_end_keeps_their_tokens(policy, prompts):
    """Every row emits EOS before the limit, so a host sync finds no row running and the loop
    stops early: the rows' tokens must still be written out (they were lost once, giving every
    row max_new_tokens pad tokens: an empty response 'cut off at the limit')."""
    params = SamplingParams(n=2, max_new_tokens=30, temperature=0.0, return_logprobs=True)
    free, _ = _both(policy, prompts[:1], params)
    eos = int(free.response_ids[0, 4])                # greedy: both rows emit it at step 4 (or before)
    for check_every in (2, 16):                         # ended at a compaction sync, and at the first one
        a, b = _both(policy, prompts[:1], params, eos=eos, check_every=check_every)
        assert b.finish_reasons == ["stop", "stop"] and int(b.response_mask.sum(1).max()) <= 5
        assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts and b.texts[0] != ""
        assert (a.logprobs - b.logprobs).abs().max() < 1e-4
