"""Batched M-RoPE position ids: hand-computed values, and equality with transformers' own."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from PIL import Image

from prism_rl.models.mrope import batched_rope_index, install_batched_rope_index, mrope_position_ids

IMG = 9  # image token id in the hand-made rows


def test_hand_computed_row():
    # [pad | text text | 4 image tokens of a 2x2 merged grid | text text]
    ids = torch.tensor([[0, 5, 6, IMG, IMG, IMG, IMG, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    grid = torch.tensor([[1, 4, 4]])  # merge 2 -> h = w = 2
    pos = mrope_position_ids(ids, mask, grid, IMG, 2)
    assert pos[:, 0].tolist() == [[0, 0, 1, 2, 2, 2, 2, 4, 5],
                                  [0, 0, 1, 2, 2, 3, 3, 4, 5],
                                  [0, 0, 1, 2, 3, 2, 3, 4, 5]]


def test_wide_image_advances_by_its_longer_side_and_grids_go_in_reading_order():
    # row 0: one 1x3 image; row 1: text, then a 2x1 image. Blocks: row 0's first, then row 1's.
    ids = torch.tensor([[IMG, IMG, IMG, 5], [5, IMG, IMG, 6]])
    mask = torch.ones_like(ids)
    grid = torch.tensor([[1, 2, 6], [1, 4, 2]])  # merged (1, 3) and (2, 1)
    pos = mrope_position_ids(ids, mask, grid, IMG, 2)
    assert pos[:, 0].tolist() == [[0, 0, 0, 3], [0, 0, 0, 3], [0, 1, 2, 3]]
    assert pos[:, 1].tolist() == [[0, 1, 1, 3], [0, 1, 2, 3], [0, 1, 1, 3]]


def test_mismatched_grid_is_an_error():
    ids = torch.tensor([[IMG, IMG, 5]])
    with pytest.raises(ValueError, match="image blocks"):
        mrope_position_ids(ids, torch.ones_like(ids), None, IMG, 2)
    with pytest.raises(ValueError, match="more tokens"):
        mrope_position_ids(ids, torch.ones_like(ids), torch.tensor([[1, 2, 2]]), IMG, 2)


def _png(w: int, h: int, color: str) -> Image.Image:
    img = Image.new("RGB", (w, h), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image.open(buf)


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{pad}How many red circles?",                       # square image
             f"Look: {pad} and then {pad} compare them please",   # two images, one wide
             f"{pad}sum"]                                         # tall image, short row
    images = [[_png(96, 96, "red")], [_png(64, 64, "blue"), _png(128, 64, "green")], [_png(64, 128, "red")]]
    batch = proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    return model, dict(batch)


def test_equals_transformers_get_rope_index(model_and_batch):
    model, batch = model_and_batch
    assert batch["attention_mask"].min() == 0  # the rows really are left-padded
    original = model.model.get_rope_index
    fast = batched_rope_index(original, model.config.image_token_id, model.config.vision_config.spatial_merge_size)
    wanted = {k: v for k, v in batch.items() if k in inspect.signature(original).parameters}
    (ours, our_deltas), (theirs, their_deltas) = fast(**wanted), original(**wanted)
    valid = batch["attention_mask"].bool()
    assert torch.equal(ours[:, valid], theirs[:, valid])
    assert torch.equal(our_deltas, their_deltas)
    # positional calls, as older transformers make them, bind to the same arguments
    names = [k for k in inspect.signature(original).parameters if k not in ("args", "kwargs")]
    args = [wanted.get(k) for k in names[:max(names.index(k) for k in wanted) + 1]]
    assert torch.equal(fast(*args)[0][:, valid], theirs[:, valid])


def test_installed_model_forward_and_generate_are_unchanged(tiny_model_dir, model_and_batch):
    from transformers import AutoModelForImageTextToText
    plain, batch = model_and_batch
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    assert install_batched_rope_index(model) and model.model.get_rope_index.batched
    inputs = {k: v for k, v in batch.items() if k in inspect.signature(model.model.forward).parameters}
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = (m.model(**inputs, use_cache=False).last_hidden_state for m in (model, plain))
        torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=0)
        gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**batch, **gen), plain.generate(**batch, **gen))
