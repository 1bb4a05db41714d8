"""The discriminator scores the tokens the policy sampled, cut where the format ends the caption;
teacher text and warm-up pairs are turned into the same token form (METHOD.md section 5)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from prism_rl.config import WarmupDataConfig
from prism_rl.data.layouts import PairRecord
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response, split_text
from prism_rl.models.discriminator import SEGMENT_CAPTION, SEGMENT_REASONING, Discriminator, init_discriminator, score_segments
from prism_rl.models.loading import special_ids
from prism_rl.models.segments import rollout_segments, split_ids
from prism_rl.trainers.align import Teachers
from prism_rl.trainers.warmup import pair_inputs

from conftest import png_bytes

TEACHER = make_response("- a red circle\n- 3 squares", "3 squares and 1 circle make 4 shapes.", "4")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def record():
    cap, cot = split_text(TEACHER)
    return Record(id="7", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": "<image>How many shapes?"}],
                  images=[ImageRef(data=png_bytes())], ground_truth="4",
                  extra={"teacher_caption": cap, "teacher_cot": cot.lstrip()})


def canonical(processor, text: str) -> list[int]:
    """The ids a policy samples when it emits the tokenizer's own tokens of ``text`` and stops."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [special_ids(processor)[0]]


def chunked(processor, text: str, size: int) -> list[int]:
    """A valid but non-canonical token sequence for ``text``: each ``size``-character chunk
    tokenised on its own (format tags get cut into pieces)."""
    tok = processor.tokenizer
    ids = [i for s in range(0, len(text), size) for i in tok(text[s:s + size], add_special_tokens=False)["input_ids"]]
    return ids + [special_ids(processor)[0]]


def as_rollouts(rows: list[list[int]], pad: int = 0):
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def fed_rows(disc: Discriminator):
    """Wrap ``disc.forward``; the returned list fills with (token ids, segment id) per fed row."""
    seen, inner = [], disc.forward

    def forward(batch, segment_ids=None):
        for ids, m, seg in zip(batch["input_ids"], batch["attention_mask"], segment_ids):
            seen.append((ids[m.bool()].tolist(), int(seg[m.bool()][-1])))
        return inner(batch, segment_ids=segment_ids)

    disc.forward = forward
    return seen


def test_discriminator_is_fed_exactly_the_sampled_ids(tiny_model_dir, processor, record, tmp_path):
    sampled = chunked(processor, TEACHER, 3)
    assert sampled != canonical(processor, TEACHER)        # a re-tokenisation would change these ids
    ids, mask = as_rollouts([sampled, canonical(processor, "no format")])
    segs = rollout_segments(ids, mask, processor.tokenizer)
    assert segs[1] is None
    k = len(segs[0].caption)
    assert segs[0].caption.tolist() + segs[0].reasoning.tolist() == sampled
    assert processor.tokenizer.decode(sampled[:k]).endswith("</caption>")
    assert not processor.tokenizer.decode(sampled[:k - 1]).endswith("</caption>")
    disc = Discriminator.load(init_discriminator(tiny_model_dir, tmp_path / "disc", seed=0))
    seen = fed_rows(disc)
    prompt = encode_prompt(processor, record)
    with torch.no_grad():
        out = score_segments(disc, processor, [prompt, prompt], segs)
    p = prompt.input_ids.tolist()
    assert sorted(seen, key=lambda r: r[1]) == [(p + sampled[:k], SEGMENT_CAPTION), (p + sampled[k:], SEGMENT_REASONING)]
    assert out.valid.tolist() == [True, False]


def test_the_caption_ends_where_the_format_ends_it(processor):
    text = "<caption>a</caption> b</caption>\n<think>t</think>\n<answer>1</answer>"
    seg = split_ids(canonical(processor, text), processor.tokenizer)
    assert processor.tokenizer.decode(seg.caption) == "<caption>a</caption> b</caption>"
    assert processor.tokenizer.decode(seg.reasoning, skip_special_tokens=True) == "\n<think>t</think>\n<answer>1</answer>"
    assert split_text(text)[0] == "<caption>a</caption> b</caption>"


def test_teacher_text_and_a_rollout_of_the_same_text_are_identical(processor, record):
    teacher = Teachers([record], processor)[record]
    ids, mask = as_rollouts([canonical(processor, TEACHER)])
    (student,) = rollout_segments(ids, mask, processor.tokenizer)
    assert torch.equal(teacher.caption, student.caption) and torch.equal(teacher.reasoning, student.reasoning)
    # the separator white space is part of the reasoning segment, for both
    assert processor.tokenizer.decode(teacher.reasoning).startswith("\n<think>")


def test_warmup_pairs_have_the_alignment_form(processor, record):
    student = make_response("- a blue square", "I see 2 shapes.", "2")
    s_cap, s_cot = split_text(student)
    pair = PairRecord(record=record, teacher_caption=record.extra["teacher_caption"], student_caption=s_cap,
                      teacher_cot=record.extra["teacher_cot"], student_cot=s_cot.lstrip())
    (item,) = pair_inputs(processor, [pair], WarmupDataConfig(), special_ids(processor)[0], BadRecords())
    ids, mask = as_rollouts([canonical(processor, student)])
    (rolled,) = rollout_segments(ids, mask, processor.tokenizer)
    assert torch.equal(item.student.caption, rolled.caption) and torch.equal(item.student.reasoning, rolled.reasoning)
    teacher = Teachers([record], processor)[record]
    assert torch.equal(item.teacher.caption, teacher.caption) and torch.equal(item.teacher.reasoning, teacher.reasoning)
    assert torch.equal(item.prompt.input_ids, encode_prompt(processor, record).input_ids)


def test_warmup_pairs_over_the_length_limit_are_named_or_skipped(processor, record):
    cap, cot = record.extra["teacher_caption"], record.extra["teacher_cot"]
    pair = PairRecord(record=record, teacher_caption=cap, student_caption=cap, teacher_cot=cot, student_cot=cot)
    short = WarmupDataConfig(max_length=20)
    with pytest.raises(DataError, match=r"record .*over data.max_length=20"):
        pair_inputs(processor, [pair], short, special_ids(processor)[0], BadRecords())
    bad = BadRecords()
    assert pair_inputs(processor, [pair], short.model_copy(update={"skip_bad": True}), special_ids(processor)[0], bad) == []
    assert bad.count == 1
    broken = PairRecord(record=record, teacher_caption="no tags", student_caption=cap, teacher_cot=cot, student_cot=cot)
    with pytest.raises(DataError, match="teacher_cot.*format-valid"):
        pair_inputs(processor, [broken], WarmupDataConfig(), special_ids(processor)[0], BadRecords())
