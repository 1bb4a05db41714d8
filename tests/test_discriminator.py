"""The discriminator: upcycling, last-token value head, segment scoring, routing, variants."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

from prism_rl.algorithms import load_balancing_loss
from prism_rl.data.processing import collate, encode_prompt, pad_sequences
from prism_rl.data.records import ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response, split_text
from prism_rl.models.discriminator import (
    DISC_CONFIG_NAME,
    SEGMENT_CAPTION,
    SEGMENT_REASONING,
    VALUE_HEAD_NAME,
    Discriminator,
    expert_load_from_router_logits,
    init_discriminator,
    last_valid_index,
    score_segments,
    segment_examples,
    strip_images,
    upcycle,
)
from prism_rl.models.loading import special_ids, vision_token_ids
from prism_rl.models.logprobs import MODEL_INPUT_KEYS
from prism_rl.models.segments import split_ids, text_segments

from conftest import png_bytes

QUESTIONS = ["How many red circles are there?", "What is the sum of the digits?",
             "The largest bar is B. Which bar is the largest one in the chart?"]
RESPONSE = make_response("- white background\n- a red circle at top-left", "There is 1 red circle.", "1")


def _record(i: int) -> Record:
    colors, shapes = ["red", "blue", "green"], ["circle", "square", "circle"]
    return Record(id=str(i), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": "<image>" + QUESTIONS[i]}],
                  images=[ImageRef(data=png_bytes(colors[i], shape=shapes[i]))])


def _segs(processor, texts):
    """Segments of responses sampled as the canonical tokens of ``texts`` (closed by <|im_end|>)."""
    tok, eos = processor.tokenizer, special_ids(processor)[0]
    return [split_ids(tok(t, add_special_tokens=False)["input_ids"] + [eos], tok) for t in texts]


def _inputs(batch):
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(processor):
    return [encode_prompt(processor, _record(i)) for i in range(len(QUESTIONS))]


@pytest.fixture(scope="module")
def moe_exact_dir(tiny_model_dir, tmp_path_factory):
    return upcycle(tiny_model_dir, tmp_path_factory.mktemp("moe0"), noise_std=0.0)


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir, tmp_path_factory):
    return upcycle(tiny_model_dir, tmp_path_factory.mktemp("moe"), noise_std=0.01)


@pytest.fixture(scope="module")
def dense_model(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def _disc(path, **kw) -> Discriminator:
    return Discriminator(AutoModelForImageTextToText.from_pretrained(path), seed=0, **kw).eval()


@pytest.fixture(scope="module")
def disc(moe_dir):
    """A shared learned-routing discriminator in eval mode, for tests that do not change it."""
    return _disc(moe_dir)


# --------------------------------------------------------------------------- upcycling


def test_upcycle_without_noise_reproduces_dense_hidden_states(moe_exact_dir, dense_model, prompts):
    moe = AutoModelForImageTextToText.from_pretrained(moe_exact_dir).eval()
    batch = collate(prompts, pad_id=0, side="left")
    with torch.no_grad():
        h_dense = dense_model.model(**_inputs(batch)).last_hidden_state
        h_moe = moe.model(**_inputs(batch)).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert batch["pixel_values"] is not None and valid.sum() > 50
    torch.testing.assert_close(h_moe[valid], h_dense[valid], atol=1e-5, rtol=1e-5)


def test_upcycle_with_noise_is_close_but_not_equal(moe_dir, dense_model, prompts):
    moe = AutoModelForImageTextToText.from_pretrained(moe_dir).eval()
    batch = collate(prompts[:1], pad_id=0)
    with torch.no_grad():
        a = dense_model.model(**_inputs(batch)).last_hidden_state
        b = moe.model(**_inputs(batch)).last_hidden_state
    assert (a - b).abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9


def test_upcycled_folder_config_and_weights(moe_dir, moe_exact_dir, dense_model):
    moe = AutoModelForImageTextToText.from_pretrained(moe_dir)
    exact = AutoModelForImageTextToText.from_pretrained(moe_exact_dir)
    assert type(moe).__name__ == "Qwen3VLMoeForConditionalGeneration"
    t = moe.config.text_config
    dt = dense_model.config.text_config
    assert (t.num_experts, t.num_experts_per_tok, t.decoder_sparse_step, t.mlp_only_layers) == (4, 2, 1, [])
    assert t.moe_intermediate_size == dt.intermediate_size and t.router_aux_loss_coef == 0.01
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (dt.hidden_size, dt.num_hidden_layers, dt.vocab_size)
    inter = dt.intermediate_size
    for dl, ml, xl in zip(dense_model.model.language_model.layers, moe.model.language_model.layers,
                          exact.model.language_model.layers):
        gate, up, down = dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight, dl.mlp.down_proj.weight
        gu, dn = ml.mlp.experts.gate_up_proj, ml.mlp.experts.down_proj
        assert gu.shape == (4, 2 * inter, dt.hidden_size) and dn.shape == (4, dt.hidden_size, inter)
        for e in range(4):  # noise 0: exact copies
            assert torch.equal(xl.mlp.experts.gate_up_proj[e, :inter], gate)
            assert torch.equal(xl.mlp.experts.gate_up_proj[e, inter:], up)
            assert torch.equal(xl.mlp.experts.down_proj[e], down)
        noise = torch.cat([(gu - torch.cat([gate, up])).flatten(), (dn - down).flatten()])
        assert abs(noise.std().item() - 0.01) < 5e-4 and abs(noise.mean().item()) < 5e-4
        assert not torch.equal(gu[0], gu[1])
        assert abs(ml.mlp.gate.weight.std().item() - 0.02) < 3e-3
        assert torch.equal(ml.self_attn.q_proj.weight, dl.self_attn.q_proj.weight)
        assert torch.equal(ml.input_layernorm.weight, dl.input_layernorm.weight)
    assert torch.equal(moe.model.visual.patch_embed.proj.weight, dense_model.model.visual.patch_embed.proj.weight)
    assert torch.equal(moe.get_input_embeddings().weight, dense_model.get_input_embeddings().weight)
    assert torch.equal(moe.lm_head.weight, dense_model.lm_head.weight)
    assert AutoProcessor.from_pretrained(moe_dir).tokenizer.get_vocab() == \
        AutoProcessor.from_pretrained(moe_exact_dir).tokenizer.get_vocab()


# --------------------------------------------------------------------------- value head


def test_last_valid_index_left_and_right():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_valid_index(m).tolist() == [3, 2, 0, 3]


def test_scores_independent_of_padding_and_equal_head_at_last_token(disc, prompts):
    with torch.no_grad():
        alone = torch.stack([disc(collate([p], 0)).scores[0] for p in prompts])
        left = disc(collate(prompts, 0, side="left")).scores
        right_batch = collate(prompts, 0, side="right")
        right = disc(right_batch).scores
        hidden = disc.backbone.model(**_inputs(right_batch)).last_hidden_state
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # every batch row but the longest is padded
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    by_hand = torch.stack([hidden[i, n - 1] @ disc.value_head.weight[0] for i, n in enumerate(lengths)])
    torch.testing.assert_close(by_hand, alone, atol=1e-5, rtol=0)
    assert alone.std() > 0


def test_scores_are_clipped(moe_dir, prompts):
    disc = _disc(moe_dir)
    batch = collate(prompts, 0)
    with torch.no_grad():
        raw = disc(batch).scores
        disc.value_head.weight.mul_(1e4)
        big = disc(batch).scores
    assert raw.abs().max() < 10
    assert set(big.abs().tolist()) == {10.0}
    assert torch.equal(big.sign(), raw.sign())
    disc.clip = (-0.5, 2.0)
    with torch.no_grad():
        assert set(disc(batch).scores.tolist()) <= {-0.5, 2.0}


# --------------------------------------------------------------------------- segment scoring


class _Recorder:
    """Wraps ``disc.forward`` to keep the batches and segment ids it is fed."""

    def __init__(self, disc):
        self.calls, self.inner = [], disc.forward
        disc.forward = self

    def __call__(self, batch, segment_ids=None):
        self.calls.append((batch, segment_ids))
        return self.inner(batch, segment_ids=segment_ids)

    def rows(self):
        """(token ids, segment ids) of every fed sequence, padding removed."""
        out = []
        for batch, seg in self.calls:
            for ids, m, s in zip(batch["input_ids"], batch["attention_mask"], seg):
                out.append((ids[m.bool()], s[m.bool()]))
        return out


def test_segment_scoring_feeds_prompt_plus_each_segment(moe_dir, processor, prompts):
    disc = _disc(moe_dir)
    rec = _Recorder(disc)
    tok = processor.tokenizer
    with torch.no_grad():
        out = score_segments(disc, processor, prompts[:1], _segs(processor, [RESPONSE]))
    rows = rec.rows()
    assert len(rows) == 2
    p_ids = prompts[0].input_ids
    caption_seg, reasoning_seg = split_text(RESPONSE)
    fed = {int(seg[-1]): ids for ids, seg in rows}
    # the reasoning segment is every token after the caption's, separator white space included
    for sid, text in ((SEGMENT_CAPTION, caption_seg), (SEGMENT_REASONING, reasoning_seg + "<|im_end|>")):
        ids = fed[sid]
        assert torch.equal(ids[:len(p_ids)], p_ids)
        assert tok.decode(ids[len(p_ids):]) == text
        assert tok.decode(ids) == tok.decode(p_ids) + text
    assert tok.decode(fed[SEGMENT_CAPTION][len(p_ids):]).endswith("</caption>")
    assert tok.decode(fed[SEGMENT_REASONING][len(p_ids):]).lstrip().startswith("<think>")
    # the segment ids mark prompt tokens free and segment tokens with their segment
    for _, seg in rows:
        assert seg[:len(p_ids)].eq(0).all() and seg[len(p_ids):].eq(seg[-1]).all()
    # scores are the discriminator's scores of exactly those sequences
    with torch.no_grad():
        for sid, score in ((SEGMENT_CAPTION, out.cap[0]), (SEGMENT_REASONING, out.reason[0])):
            ids = fed[sid]
            batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None],
                     "mm_token_type_ids": torch.cat([prompts[0].mm_token_type_ids,
                                                     torch.zeros(len(ids) - len(p_ids), dtype=torch.long)])[None],
                     "pixel_values": prompts[0].pixel_values, "image_grid_thw": prompts[0].image_grid_thw}
            assert torch.allclose(rec.inner(batch).scores[0], score, atol=1e-5)
    assert out.valid.tolist() == [True]


def test_invalid_responses_get_zero_and_order_is_kept(moe_dir, processor, prompts):
    disc = _disc(moe_dir)
    other = make_response("- a blue square", "Count: 2 squares, so 2.", "2")
    responses = [RESPONSE, "no tags at all", other]
    with torch.no_grad():
        out = score_segments(disc, processor, prompts, _segs(processor, responses), batch_size=3)
        solo = [score_segments(disc, processor, [prompts[i]], _segs(processor, [responses[i]])) for i in (0, 2)]
    assert out.valid.tolist() == [True, False, True]
    assert out.cap[1].item() == 0.0 and out.reason[1].item() == 0.0
    for i, s in zip((0, 2), solo):
        assert torch.allclose(out.cap[i], s.cap[0], atol=1e-5)
        assert torch.allclose(out.reason[i], s.reason[0], atol=1e-5)
    assert out.cap[0] != out.reason[0]
    with torch.no_grad():
        none = score_segments(disc, processor, prompts[:2], _segs(processor, ["bad", "<caption>x</caption>"]))
    assert none.valid.tolist() == [False, False] and none.cap.tolist() == [0.0, 0.0]


def test_text_segments_score_like_sampled_tokens_and_are_differentiable(moe_dir, processor, prompts):
    disc = _disc(moe_dir)
    cap, rest = split_text(RESPONSE)
    a = score_segments(disc, processor, prompts[:1], [text_segments(processor, cap, rest)])
    b = score_segments(disc, processor, prompts[:1], _segs(processor, [RESPONSE]))
    assert torch.allclose(a.cap, b.cap, atol=1e-6) and torch.allclose(a.reason, b.reason, atol=1e-6)
    assert b.cap.requires_grad and b.reason.requires_grad
    (b.cap.sum() + b.reason.sum() + 0.01 * b.aux_loss).backward()
    assert disc.value_head.weight.grad.abs().sum() > 0
    assert disc.backbone.model.language_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        c = score_segments(disc, processor, prompts[:1], _segs(processor, [RESPONSE]))
    assert not c.cap.requires_grad


# --------------------------------------------------------------------------- routing


def _capture_routing(disc):
    """Hooks (appended after the segment hook) keeping every router's (logits, top-k indices)."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append((o[0].detach(), o[2])))
             for layer in disc.backbone.model.language_model.layers]
    return seen, hooks


def _segment_batch(processor, prompts):
    cap, rest = split_text(RESPONSE)
    ex = segment_examples(prompts, [text_segments(processor, cap, rest)] * len(prompts))
    return collate([e for e, _ in ex], 0), pad_sequences([s for _, s in ex], 0, "right")


@pytest.mark.parametrize("routing", ["segment", "learned"])
def test_segment_routing_pins_segments_to_expert_halves(moe_dir, processor, prompts, routing):
    disc = _disc(moe_dir, routing=routing)
    batch, seg = _segment_batch(processor, prompts[:2])
    seen, hooks = _capture_routing(disc)
    with torch.no_grad():
        out = disc(batch, segment_ids=seg)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    flat = seg.reshape(-1)
    cap_idx = torch.cat([idx[flat == SEGMENT_CAPTION] for _, idx in seen])
    reason_idx = torch.cat([idx[flat == SEGMENT_REASONING] for _, idx in seen])
    free_idx = torch.cat([idx[flat == 0] for _, idx in seen])
    assert cap_idx.numel() > 20 and reason_idx.numel() > 20
    if routing == "segment":
        assert cap_idx.lt(2).all() and reason_idx.ge(2).all()
        assert free_idx.lt(2).any() and free_idx.ge(2).any()  # prompt tokens route freely
        logits = seen[0][0]
        assert torch.isinf(logits[flat == SEGMENT_CAPTION][:, 2:]).all()
        assert torch.isfinite(logits[flat == 0]).all()
    else:
        assert cap_idx.ge(2).any() and reason_idx.lt(2).any()
    assert torch.isfinite(out.aux_loss) and abs(out.expert_load.sum().item() - 1) < 1e-6


def test_segment_routing_without_segment_ids_equals_learned(moe_dir, disc, prompts):
    batch = collate(prompts[:2], 0)
    with torch.no_grad():
        a = _disc(moe_dir, routing="segment")(batch).scores
        b = disc(batch).scores
    assert torch.equal(a, b)


def test_segment_routing_gradients_are_finite(moe_dir, processor, prompts):
    disc = _disc(moe_dir, routing="segment")
    batch, seg = _segment_batch(processor, prompts[:1])
    out = disc(batch, segment_ids=seg)
    (out.scores.sum() + 0.01 * out.aux_loss).backward()
    for layer in disc.backbone.model.language_model.layers:
        g = layer.mlp.gate.weight.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_segment_routing_rejects_dense_and_big_top_k(tiny_model_dir):
    with pytest.raises(ValueError, match="MoE backbone"):
        _disc(tiny_model_dir, routing="segment")
    with pytest.raises(ValueError, match="routing must be"):
        _disc(tiny_model_dir, routing="sticky")


def test_aux_loss_and_expert_load_match_hand_computation(disc, processor, prompts):
    batch, seg = _segment_batch(processor, prompts)
    with torch.no_grad():
        out = disc(batch, segment_ids=seg)
        logits = disc.backbone.model(**_inputs(batch), output_router_logits=True).router_logits
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # padding is excluded
    expected = load_balancing_loss(list(logits), 2, 4, mask=mask)
    assert torch.allclose(out.aux_loss, expected, atol=1e-6)
    hf = load_balancing_loss_func(tuple(logits), 4, 2, mask)
    assert torch.allclose(out.aux_loss, hf, atol=1e-5)
    counts = torch.zeros(4)
    for z in logits:
        top = z.topk(2, dim=-1).indices[mask.reshape(-1).bool()]
        counts += torch.bincount(top.reshape(-1), minlength=4)
    torch.testing.assert_close(out.expert_load, counts / counts.sum())
    assert abs(out.expert_load.sum().item() - 1.0) < 1e-6
    assert torch.equal(expert_load_from_router_logits(list(logits), mask, 2, 4), out.expert_load)


# --------------------------------------------------------------------------- variants and persistence


def test_text_only_inputs_have_no_image(tiny_model_dir, processor, prompts, tmp_path):
    out_dir = init_discriminator(tiny_model_dir, tmp_path / "d", dense=True, text_only=True)
    disc = Discriminator.load(out_dir)
    assert disc.variant == "dense" and disc.text_only
    stripped = strip_images(prompts[0], vision_token_ids(processor.tokenizer))
    vision = {processor.tokenizer.convert_tokens_to_ids(t)
              for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    assert not vision & set(stripped.input_ids.tolist())
    assert stripped.pixel_values is None and stripped.mm_token_type_ids.eq(0).all()
    assert processor.tokenizer.decode(stripped.input_ids).endswith(QUESTIONS[0] + "<|im_end|>\n<|im_start|>assistant\n")
    rec = _Recorder(disc)
    with torch.no_grad():
        out = score_segments(disc, processor, prompts[:2], _segs(processor, [RESPONSE, RESPONSE]))
    for batch, _ in rec.calls:
        assert "pixel_values" not in batch and not vision & set(batch["input_ids"].flatten().tolist())
    assert out.expert_load.numel() == 0 and out.aux_loss.item() == 0.0
    with pytest.raises(ValueError, match="text-only"):
        rec.inner(collate(prompts[:1], 0))


@pytest.mark.parametrize("kind", ["moe-segment", "dense-text"])
def test_save_load_round_trip(tiny_model_dir, processor, prompts, tmp_path, kind):
    kw = dict(routing="segment") if kind == "moe-segment" else dict(dense=True, text_only=True)
    out_dir = init_discriminator(tiny_model_dir, tmp_path / kind, **kw)
    cfg = json.loads((out_dir / DISC_CONFIG_NAME).read_text())
    assert (out_dir / VALUE_HEAD_NAME).exists() and (out_dir / "config.json").exists()
    assert cfg["variant"] == ("moe" if kind == "moe-segment" else "dense")
    assert (cfg["clip_min"], cfg["clip_max"]) == (-10.0, 10.0)
    if kind == "moe-segment":
        assert (cfg["routing"], cfg["experts"], cfg["top_k"], cfg["aux_coef"]) == ("segment", 4, 2, 0.01)
    a = Discriminator.load(out_dir)
    b = Discriminator.load(out_dir)
    assert a.config_dict() == cfg
    with torch.no_grad():
        sa = score_segments(a, processor, prompts, _segs(processor, [RESPONSE] * 3))
        a.save(tmp_path / "again")
        sc = score_segments(Discriminator.load(tmp_path / "again"), processor, prompts, _segs(processor, [RESPONSE] * 3))
        sb = score_segments(b, processor, prompts, _segs(processor, [RESPONSE] * 3))
    assert torch.equal(sa.cap, sb.cap) and torch.equal(sa.reason, sb.reason)
    assert torch.equal(sa.cap, sc.cap) and torch.equal(sa.reason, sc.reason)
    assert AutoProcessor.from_pretrained(out_dir).tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_init_discriminator_moe_matches_upcycle(tiny_model_dir, moe_dir, processor, prompts, tmp_path):
    out_dir = init_discriminator(tiny_model_dir, tmp_path / "m", seed=0)
    disc = Discriminator.load(out_dir)
    ref = AutoModelForImageTextToText.from_pretrained(moe_dir)
    for (k, v), (k2, v2) in zip(disc.backbone.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert disc.value_head.weight.std().item() == pytest.approx(0.02, abs=0.006)
