"""The lazily encoded RL prompt pool and how the prompt stream treats bad records."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from prism_rl.data.processing import LazyPrompts, encode_prompt
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.data.stream import PromptStream

from conftest import png_bytes


def _record(i: int, question: str, image: bytes) -> Record:
    return Record(id=f"r{i}", messages=[{"role": "user", "content": f"<image>{question}"}],
                  images=[ImageRef(data=image)], ground_truth="3", source="pool.jsonl", index=i)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def _limit_between(processor, short: Record, long: Record) -> int:
    a, b = (encode_prompt(processor, r).prompt_len for r in (short, long))
    assert a < b
    return (a + b) // 2


def test_pool_encodes_like_eager_and_only_when_indexed(processor):
    recs = [_record(0, "How many red circles?", png_bytes("red")), _record(1, "Sum?", png_bytes("blue", 64))]
    pool = LazyPrompts(recs, processor, max_length=10_000)
    assert len(pool) == 2
    for i, rec in enumerate(recs):
        lazy, eager = pool[i], encode_prompt(processor, rec)
        assert torch.equal(lazy.input_ids, eager.input_ids)
        assert torch.equal(lazy.pixel_values, eager.pixel_values)
        assert torch.equal(lazy.image_grid_thw, eager.image_grid_thw)
        assert lazy.record is rec


def test_unreadable_image_is_found_before_training(processor):
    recs = [_record(0, "ok", png_bytes()), _record(1, "broken", b"not an image"), _record(2, "ok", png_bytes())]
    with pytest.raises(DataError, match=r"pool.jsonl, record 1, field 'images'"):
        LazyPrompts(list(recs), processor, 10_000).check_images()
    bad = BadRecords()
    pool = LazyPrompts(list(recs), processor, 10_000).check_images(skip_bad=True, bad=bad)
    assert [r.index for r in pool.records] == [0, 2]
    assert bad.count == 1 and "record 1" in bad.reasons[0]


def test_stream_skips_a_bad_record_once_and_keeps_the_order(processor):
    short = [_record(i, "How many?", png_bytes()) for i in (0, 2, 3)]
    long = _record(1, "How many? " * 40, png_bytes())
    recs = [short[0], long, short[1], short[2]]
    pool = LazyPrompts(recs, processor, max_length=_limit_between(processor, short[0], long))
    bad = BadRecords()
    stream = PromptStream(pool, seed=3, bad=bad)
    drawn = [p.record.index for p in stream.take(9)]  # three epochs of the three good records
    assert sorted(drawn[:3]) == sorted(drawn[3:6]) == sorted(drawn[6:]) == [0, 2, 3]
    assert bad.count == 1 and bad.reasons[0].startswith("pool.jsonl, record 1:")
    # the good records come in the order an all-good stream with the same seed gives, minus record 1
    def epoch_order(e):
        s = PromptStream(list(range(4)), seed=3)
        s.load_state_dict({"epoch": e, "pos": 0})
        return s._order
    order = [i for e in range(3) for i in epoch_order(e)]
    assert drawn == [recs[i].index for i in order if i != 1]
    with pytest.raises(DataError, match="record 1: prompt is"):
        PromptStream(pool, seed=3).take(4)


def test_stream_of_only_bad_records_stops(processor):
    long = [_record(i, "How many? " * 40, png_bytes()) for i in range(2)]
    pool = LazyPrompts(long, processor, max_length=_limit_between(processor, _record(9, "x", png_bytes()), long[0]))
    with pytest.raises(ValueError, match="no usable prompts"):
        PromptStream(pool, seed=0, bad=BadRecords()).take(1)
