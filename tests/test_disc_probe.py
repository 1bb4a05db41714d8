"""bench/disc_probe.py (issue 16's style control): the teacher/public pairs it builds from a
synthetic SFT pool differ exactly where the public demonstration's slip says, and a
discriminator scores identical segments with a gap of exactly zero; the records that give no
pair are counted per reason, never dropped silently."""

from __future__ import annotations

import copy
import json
import sys
from collections import defaultdict

import pytest

from prism_rl.cli import main
from prism_rl.data.layouts import read_pairs, read_records
from prism_rl.models.discriminator import init_discriminator

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from disc_probe import main as probe_main  # noqa: E402
from disc_probe import probe, probe_pairs, table, write_slip_pairs  # noqa: E402


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    for style in ("teacher", "varied"):
        assert main(["data", "synth", "--out", str(root / style), "--n", "120", "--seed", "0", "--image-size", "64",
                     "--teacher-frac", "0.5", "--public-error-rate", "0.5", "--public-style", style]) == 0
    return root


def test_pairs_differ_where_the_slip_says(pools):
    matched, skipped = probe_pairs(read_records(pools / "teacher" / "sft.json"))
    varied, _ = probe_pairs(read_records(pools / "varied" / "sft.json"))
    assert set(skipped) == {"no_teacher"}   # a synthetic pool's only unpaired records: half lack the teacher's
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
    n_teacher = sum(1 for r in read_records(pools / "teacher" / "sft.json") if r.extra["style"] == "teacher")
    n_public = len(read_records(pools / "teacher" / "sft.json")) - n_teacher
    assert res["records_skipped"] == {"no_teacher": n_public - n_teacher}   # every teacher has a public one
    assert f"records without a pair (x): no_teacher {n_public - n_teacher}" in table({"x": res})


def test_write_pairs_gives_warmup_pairs_of_the_slipped_demonstrations(pools, tmp_path):
    groups, _ = probe_pairs(read_records(pools / "teacher" / "sft.json"))
    out = tmp_path / "slips.jsonl"
    assert probe_main(["--data", str(pools / "teacher" / "sft.json"), "--write-pairs", str(out)]) == 0
    back = read_pairs(out)
    assert len(back) == len(groups["perception"]) + len(groups["reasoning"])
    assert all(p.teacher_cot != p.student_cot for p in back) and back[0].record.images


@pytest.fixture
def hand_pool(pools, tmp_path):
    """Records of nine synthetic problems, seven of them broken in a known way (images made
    absolute: the file lives elsewhere). Returns the file and the paired problem's slip kind."""
    rows = json.loads((pools / "teacher" / "sft.json").read_text())
    by_problem: dict[str, dict] = defaultdict(dict)
    for r in rows:
        r["images"] = [str(pools / "teacher" / i) for i in r["images"]]
        by_problem[r["problem_id"]][r["style"]] = r
    both = [copy.deepcopy(p) for p in by_problem.values() if len(p) == 2]
    slipped = [p for p in both if p["public"]["public_error"] != "none"]
    ok, typo, no_kind, bad_public, bad_teacher, lone_public, lone_teacher = slipped[:7]
    clean = next(p for p in both if p["public"]["public_error"] == "none")
    typo["public"]["public_error"] = "typo"                               # unknown_kind
    del no_kind["public"]["public_error"]                                 # unknown_kind
    bad_public["public"]["messages"][-1]["content"] = "a misread image, no caption or think tags"   # unsplittable
    bad_teacher["teacher"]["messages"][-1]["content"] = "<answer>\n3\n</answer>"   # unsplittable + teacher_unsplittable
    second = copy.deepcopy(ok["teacher"]) | {"id": ok["teacher"]["id"] + "-again"}   # extra_teacher
    stranger = copy.deepcopy(ok["public"]) | {"id": ok["public"]["id"] + "-x", "style": "student"}   # unknown_style
    records = [*ok.values(), second, stranger, *typo.values(), *no_kind.values(), *bad_public.values(),
               *bad_teacher.values(), lone_public["public"], lone_teacher["teacher"], *clean.values()]
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(records))
    return path, ok["public"]["public_error"]


HAND_SKIPS = {"unknown_style": 1, "extra_teacher": 1, "no_public": 1, "no_teacher": 1, "teacher_unsplittable": 1,
              "unknown_kind": 2, "unsplittable": 2}


def test_unpaired_records_are_counted_per_reason(hand_pool):
    path, kind = hand_pool
    groups, skipped = probe_pairs(read_records(path))
    assert {k: len(v) for k, v in groups.items()} == {"none": 1, "perception": int(kind == "perception"),
                                                      "reasoning": int(kind == "reasoning")}
    assert dict(skipped) == HAND_SKIPS


def test_write_pairs_reports_what_it_wrote_and_skipped(hand_pool, tmp_path, capsys):
    path, kind = hand_pool
    out, report = tmp_path / "pairs.jsonl", tmp_path / "report.json"
    assert probe_main(["--data", str(path), "--write-pairs", str(out), "--out", str(report)]) == 0
    expected = {"pairs": 1, "perception": int(kind == "perception"), "reasoning": int(kind == "reasoning"),
                "records_skipped": HAND_SKIPS | {"no_slip": 1}}   # the clean problem's pair is no slip
    assert json.loads(report.read_text()) == expected and len(read_pairs(out)) == 1
    printed = capsys.readouterr().out
    assert "1 pairs" in printed and "unknown_kind 2" in printed and "unsplittable 2" in printed
    assert list(write_slip_pairs(str(path), str(tmp_path / "again.jsonl"))["records_skipped"]) == [
        "unknown_style", "extra_teacher", "no_public", "no_teacher", "teacher_unsplittable", "unknown_kind",
        "unsplittable", "no_slip"]   # in SKIPS order: the same file gives the same report
