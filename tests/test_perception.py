"""The perception score (eval/perception.py) on hand-computed captions of both demonstration
styles, and on whole synthetic datasets: faithful captions score 1, slips cost what the
formula says."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from prism_rl.data.records import DataError, Record
from prism_rl.data.synth import Item, _public_caption, _teacher_caption, scene_json, synthesize
from prism_rl.eval.perception import caption_text, parse_caption, perception_score, record_perception, response_perception
from prism_rl.format import make_response

SHAPES = (Item(0, 0, "circle", "red"), Item(1, 1, "square", "blue"), Item(2, 2, "triangle", "green"))
BARS = (Item(2, 0, "bar", "red", 3), Item(2, 1, "bar", "green", 5), Item(2, 2, "bar", "blue", 2))
DIGITS = (Item(0, 0, "digit", "black", 7), Item(2, 1, "digit", "black", 3))


def _counts(caption: str, items) -> tuple[int, int, int]:
    s = perception_score(caption, scene_json(items))
    return s.correct, s.stated, s.scene


@pytest.mark.parametrize("items", [SHAPES, BARS, DIGITS])
def test_teacher_caption_scores_one(items):
    s = perception_score(_teacher_caption(items), scene_json(items))
    assert (s.correct, s.stated, s.scene) == (len(items), len(items), len(items))
    assert s.score == s.precision == s.recall == 1.0


def test_one_wrong_colour_a_missing_and_an_invented_object():
    teacher = _teacher_caption(SHAPES)
    wrong = teacher.replace("red circle", "green circle")
    s = perception_score(wrong, scene_json(SHAPES))
    assert (s.correct, s.stated, s.wrong) == (2, 3, 1)
    assert s.score == pytest.approx(2 / 4) and s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 3)
    missing = "\n".join(line for line in teacher.splitlines() if "square" not in line)
    s = perception_score(missing, scene_json(SHAPES))
    assert (s.score, s.precision, s.recall) == (pytest.approx(2 / 3), 1.0, pytest.approx(2 / 3))
    invented = teacher + "\n- red square, top-center"
    s = perception_score(invented, scene_json(SHAPES))
    assert (s.score, s.precision, s.recall) == (pytest.approx(3 / 4), pytest.approx(3 / 4), 1.0)
    # the right object in the wrong cell is wrong; an object stated twice is counted once
    assert _counts("- red circle, center", SHAPES) == (0, 1, 3)
    assert _counts("- red circle\n- red circle", SHAPES) == (1, 2, 3)
    assert perception_score("- red circle\n- red circle", scene_json(SHAPES)).score == pytest.approx(1 / 4)


def test_public_styles_are_read():
    rng = random.Random(0)
    seen = set()
    for _ in range(40):   # every public style of every scene kind scores 1 when faithful
        for items in (SHAPES, BARS, DIGITS):
            cap = _public_caption(items, rng)
            seen.add(cap.splitlines()[0][:12])
            assert perception_score(cap, scene_json(items)).score == 1.0, cap
    assert len(seen) >= 6
    assert _counts("- blue square\n- green triangle\n- red circle", SHAPES) == (3, 3, 3)
    assert _counts("- There is a red circle in the middle.", SHAPES) == (0, 1, 3)
    assert _counts("- red: circle (top left corner)\n- blue: square (middle), triangle (bottom right corner)",
                   SHAPES) == (2, 3, 3)
    assert _counts("- bar chart\n- bar heights: 3, 5, 1", BARS) == (2, 3, 3)
    assert _counts("- The middle bar is green and 4 units high.", BARS) == (0, 1, 3)
    assert _counts("- digits 7, 8", DIGITS) == (1, 2, 2)
    assert _counts("- The number 3 is in the bottom middle.", DIGITS) == (1, 1, 2)
    assert _counts('- text "3" at top-left', DIGITS) == (0, 1, 2)


def test_garbage_and_missing_caption_score_zero():
    for text in ("", "asdf qwer 3 red", "<caption>\n- zzz\n</caption>", "<think>red circle, top-left</think>"):
        assert response_perception(text, scene_json(SHAPES)) == 0.0, text
    s = perception_score("nothing here", scene_json(SHAPES))
    assert (s.correct, s.stated, s.precision, s.recall) == (0, 0, 0.0, 0.0)
    # an unclosed caption is read up to <think>; the think part is not caption
    assert caption_text("<caption>\n- red circle, top-left\n<think> blue square") == "\n- red circle, top-left\n"
    assert parse_caption("- Style: flat shapes on white, 3x3 grid") == []


def test_record_perception_needs_a_scene_and_names_a_bad_one():
    resp = make_response(_teacher_caption(SHAPES), "x", "1")
    rec = Record(id="a", messages=[], extra={}, source="t.parquet", index=4)
    assert record_perception(rec, resp) is None
    rec.extra["scene"] = scene_json(SHAPES)
    assert record_perception(rec, resp) == 1.0
    rec.extra["scene"] = json.dumps([{"shape": "circle"}])
    with pytest.raises(DataError, match=r"t.parquet, record 4, field 'scene'"):
        record_perception(rec, resp)


@pytest.mark.parametrize("style", ["varied", "teacher"])
def test_dataset_teacher_is_perfect_and_slips_cost(tmp_path, style):
    synthesize(tmp_path, 400, 2, public_error_rate=0.5, public_style=style)
    kinds = {"none": [], "reasoning": [], "perception": []}
    for split in ("align", "test"):
        for r in pq.read_table(tmp_path / f"{split}.parquet").to_pylist():
            assert response_perception(r["teacher_response"], r["scene"]) == 1.0
            kinds[r["public_error"]].append(response_perception(r["public_response"], r["scene"]))
    assert all(kinds.values())
    assert min(kinds["none"] + kinds["reasoning"]) == 1.0
    assert max(kinds["perception"]) < 1.0
