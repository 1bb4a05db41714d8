"""Per-token log-probs: chunked == unchunked, and a sequence scores the same alone and padded;
the chunked entropy against hand values and against the full logits.

DESIGN.md records a peer framework whose loss forward silently misaligned Qwen3-VL's M-RoPE
positions under one padding side; these tests pin that down for both sides.
"""

import math
from types import SimpleNamespace

import torch

from prism_rl.config import ModelConfig
from prism_rl.data.processing import collate, encode_sft
from prism_rl.data.records import ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.models.loading import load_policy, special_ids
from prism_rl.models.logprobs import (
    MODEL_INPUT_KEYS,
    head_logprobs,
    reference_token_logprobs,
    response_logprobs,
    sft_loss,
)

from conftest import png_bytes


def _records():
    out = []
    for i, (color, q, ans) in enumerate([("red", "How many red circles?", "1"),
                                         ("blue", "What color is the shape? Answer in one word please.", "blue"),
                                         ("green", "Count.", "12345")]):
        out.append(Record(id=str(i), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                               {"role": "user", "content": "<image>" + q}],
                          images=[ImageRef(data=png_bytes(color, shape="circle" if i else "square"))],
                          response=make_response(f"- a {color} shape" + " x" * i, "look" * (i + 1), ans)))
    return out


def _setup(tiny_model_dir):
    model, proc = load_policy(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), trainable=False)
    eos, pad = special_ids(proc)
    encs = [encode_sft(proc, r, eos, 4096) for r in _records()]
    return model, proc, encs, pad


@torch.no_grad()
def test_sequence_logprobs_same_alone_and_in_padded_batches(tiny_model_dir):
    model, _, encs, pad = _setup(tiny_model_dir)
    alone = [reference_token_logprobs(model, collate([e], pad))[0] for e in encs]
    for side in ("left", "right"):
        batch = collate(encs, pad, side)
        full = reference_token_logprobs(model, batch)
        width = batch["input_ids"].shape[1]
        for i, e in enumerate(encs):
            n = len(e)
            row = full[i, width - n:] if side == "left" else full[i, :n - 1]
            assert torch.allclose(row, alone[i], atol=1e-4), (side, i, (row - alone[i]).abs().max())
    # the lengths differ, so the test really exercised padding
    assert len({len(e) for e in encs}) == len(encs)


def _rl_batch(encs, pad):
    """The RL layout: prompts left-padded to a common width P, responses right-padded after them."""
    P = max(e.prompt_len for e in encs)
    width = P + max(len(e) - e.prompt_len for e in encs)
    ids = torch.full((len(encs), width), pad)
    mask, mm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(encs):
        shift = P - e.prompt_len
        ids[i, shift:shift + len(e)] = e.input_ids
        mask[i, shift:shift + len(e)] = 1
        mm[i, shift:shift + len(e)] = e.mm_token_type_ids
    batch = collate(encs, pad)
    batch.update(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm)
    return batch, P


@torch.no_grad()
def test_chunked_response_logprobs_match_reference(tiny_model_dir):
    model, _, encs, pad = _setup(tiny_model_dir)
    batch, P = _rl_batch(encs, pad)
    mask = batch["attention_mask"]
    lp = response_logprobs(model, batch, P, chunk_size=7)
    ref = reference_token_logprobs(model, batch)[:, P - 1:]
    m = mask[:, P:].bool()
    assert torch.allclose(lp[m], ref[m], atol=1e-4)
    assert (lp[~m] == 0).all()


def test_host_side_token_selection_gives_the_same_logprobs_entropy_and_gradients(tiny_model_dir):
    """``response_logprobs(host_mask=...)`` (indices picked from the host's mask, no device sync)
    against the same selection from the batch's own mask: log-probs, entropy and the weights'
    gradients equal, padded and packed; positions off the response stay 0."""
    model, _, encs, pad = _setup(tiny_model_dir)
    batch, P = _rl_batch(encs, pad)
    m = batch["attention_mask"][:, P:].bool()
    w = torch.randn(m.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    for packed in (False, True):
        got = []
        for host in (None, batch["attention_mask"]):
            model.zero_grad(set_to_none=True)
            lp, ent = response_logprobs(model, batch, P, chunk_size=5, with_entropy=True, packed=packed, host_mask=host)
            ((lp * w).sum() + ent.sum()).backward()
            got.append((lp.detach(), ent.detach(), [p.grad.clone() for p in params]))
        (lp0, en0, g0), (lp1, en1, g1) = got
        assert m.sum() > 10 and (lp1[~m] == 0).all() and (en1[~m] == 0).all() and (lp1[m] < 0).all()
        assert (lp0 - lp1).abs().max() < 1e-6 and (en0 - en1).abs().max() < 1e-6
        assert max(float((a - b).abs().max()) for a, b in zip(g0, g1)) < 1e-6
        assert sum(float(g.abs().sum()) for g in g1) > 0


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``logits`` (N, V) through the package's chunked head: the head is
    the identity, so the hidden states are the logits."""
    model = SimpleNamespace(get_output_embeddings=lambda: torch.nn.Identity())
    targets = torch.zeros(logits.shape[0], dtype=torch.long)
    lp, ent = head_logprobs(model, logits, targets, chunk_size=2, with_entropy=True)
    assert torch.allclose(lp, torch.log_softmax(logits.float(), -1)[:, 0])
    return ent


def test_entropy_hand_values():
    uniform = _entropy(torch.zeros(3, 4))
    assert torch.allclose(uniform, torch.full((3,), math.log(4.0)), atol=1e-6)
    # p = [0.25, 0.75]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    assert abs(_entropy(torch.tensor([[0.0, math.log(3.0)]])).item() - h) < 1e-6
    big = _entropy(torch.tensor([[1000.0, 0.0, -1000.0]]))  # stable for large logits
    assert torch.isfinite(big).all() and abs(big.item()) < 1e-6


@torch.no_grad()
def test_chunked_response_entropy_matches_full_logits(tiny_model_dir):
    model, _, encs, pad = _setup(tiny_model_dir)
    batch = collate(encs, pad, "right")  # the lengths differ: every row but one ends in padding
    P = min(e.prompt_len for e in encs)
    lp, ent = response_logprobs(model, batch, P, chunk_size=7, with_entropy=True)
    logits = model(**{k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}, use_cache=False).logits.float()
    ref = torch.distributions.Categorical(logits=logits[:, P - 1:-1]).entropy()
    m = batch["attention_mask"][:, P:].bool()
    assert m.any() and (~m).any() and torch.allclose(ent[m], ref[m], atol=1e-4)
    assert (ent[~m] == 0).all()
    assert torch.equal(lp, response_logprobs(model, batch, P, chunk_size=7))


def test_sft_loss_equals_mean_ce_on_assistant_tokens(tiny_model_dir):
    model, _, encs, pad = _setup(tiny_model_dir)
    batch = collate(encs, pad)
    loss, n = sft_loss(model, batch, chunk_size=5)
    ref = reference_token_logprobs(model, batch)
    keep = batch["labels"][:, 1:] != -100
    assert n == int(keep.sum()) == sum(len(e) - e.prompt_len for e in encs)
    assert torch.allclose(loss, -ref[keep].mean(), atol=1e-5)
    # checkpointed chunks must backprop the same gradient as the unchunked loss
    weight = model.get_output_embeddings().weight
    (grad,) = torch.autograd.grad(loss, weight)
    (ref_grad,) = torch.autograd.grad(-ref[keep].mean(), weight)
    assert ref_grad.abs().max() > 0 and torch.allclose(grad, ref_grad, atol=1e-6)


def test_rollouts_never_contain_vision_tokens(tiny_model_dir):
    """An untrained policy samples any token; vision placeholders must be suppressed."""
    from prism_rl.data.processing import encode_prompt
    from prism_rl.models.loading import vision_token_ids
    from prism_rl.rollout.base import SamplingParams
    from prism_rl.rollout.hf import HFEngine
    model, proc, _, _ = _setup(tiny_model_dir)
    engine = HFEngine(model, proc)
    ids = vision_token_ids(proc.tokenizer)
    assert len(ids) == 5
    # make the vision tokens the most likely ones: without suppression they would be sampled
    with torch.no_grad():
        model.get_output_embeddings().weight[ids] *= 50
    torch.manual_seed(0)
    ro = engine.generate([encode_prompt(proc, r) for r in _records()], SamplingParams(n=4, max_new_tokens=16))
    assert not torch.isin(ro.response_ids[ro.response_mask.bool()], torch.tensor(ids)).any()
    assert ro.response_mask.sum() > 0
