"""bench/disc_probe.py (issue 16's style control): the teacher/public pairs it builds from a
synthetic SFT pool differ exactly where the public demonstration's slip says, and a
discriminator scores identical segments with a gap of exactly zero."""

from __future__ import annotations

import sys

import pytest

from prism_rl.cli import main
from prism_rl.data.layouts import read_pairs, read_records
from prism_rl.models.discriminator import init_discriminator

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from disc_probe import main as probe_main  # noqa: E402
from disc_probe import probe, probe_pairs, table  # noqa: E402


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    for style in ("teacher", "varied"):
        assert main(["data", "synth", "--out", str(root / style), "--n", "120", "--seed", "0", "--image-size", "64",
                     "--teacher-frac", "0.5", "--public-error-rate", "0.5", "--public-style", style]) == 0
    return root


def test_pairs_differ_where_the_slip_says(pools):
    matched = probe_pairs(read_records(pools / "teacher" / "sft.json"))
    varied = probe_pairs(read_records(pools / "varied" / "sft.json"))
    assert all(matched[k] for k in matched) and all(varied[k] for k in varied)
    same = {k: [(p.teacher_caption == p.student_caption, p.teacher_cot == p.student_cot) for p in v]
            for k, v in matched.items()}
    assert set(same["none"]) == {(True, True)}           # the teacher's text in the teacher's template
    assert set(same["reasoning"]) == {(True, False)}     # a reasoning slip leaves the caption alone
    assert {c for c, _ in same["perception"]} == {False}  # a misread caption
    assert all(p.teacher_caption != p.student_caption for p in varied["none"])   # another template
    prompt = matched["none"][0].record
    assert [m["role"] for m in prompt.messages] == ["system", "user"] and prompt.images


def test_identical_segments_score_a_zero_gap(pools, tiny_model_dir, tmp_path):
    disc = init_discriminator(tiny_model_dir, tmp_path / "disc", experts=2, top_k=1, seed=0)
    res = probe(str(disc), str(pools / "teacher" / "sft.json"), limit=6, batch_size=8)
    assert res["none"]["pairs"] == 6 and res["none"]["cap_gap"] == 0.0 and res["none"]["reason_gap"] == 0.0
    assert res["none"]["cap_acc"] == 0.0                                  # a tie is not "teacher above"
    assert res["reasoning"]["cap_gap"] == 0.0 and res["reasoning"]["reason_gap"] != 0.0
    assert "| x | none | 6 | 0.00 | +0.00 |" in table({"x": res})


def test_write_pairs_gives_warmup_pairs_of_the_slipped_demonstrations(pools, tmp_path):
    groups = probe_pairs(read_records(pools / "teacher" / "sft.json"))
    out = tmp_path / "slips.jsonl"
    assert probe_main(["--data", str(pools / "teacher" / "sft.json"), "--write-pairs", str(out)]) == 0
    back = read_pairs(out)
    assert len(back) == len(groups["perception"]) + len(groups["reasoning"])
    assert all(p.teacher_cot != p.student_cot for p in back) and back[0].record.images
