"""The procedural visual-reasoning dataset (prism_rl.data.synth): determinism, splits,
teacher correctness, the public set's error rate and image sizes (``prism data show`` is
tested in test_show.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from prism_rl.data.layouts import read_records
from prism_rl.data.synth import FAMILIES, make_problem, synthesize, teacher_response
from prism_rl.format import extract_answer, is_format_valid, parse_response

N = 300


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "seed3"
    stats = synthesize(out, N, seed=3)
    return {"dir": out, "stats": stats, "sft": read_records(out / "sft.json"),
            "align": read_records(out / "align.parquet"),
            "test": read_records(out / "test.parquet")}


def test_same_seed_same_bytes_different_seed_differs(data, tmp_path):
    synthesize(tmp_path / "again", N, seed=3)
    synthesize(tmp_path / "other", N, seed=4)
    first, again, other = tree(data["dir"]), tree(tmp_path / "again"), tree(tmp_path / "other")
    assert set(first) == {"sft.json", "align.parquet", "test.parquet", "stats.json"} | \
        {k for k in first if k.startswith("images/")}
    assert first == again
    for name in ("sft.json", "align.parquet", "test.parquet"):
        assert first[name] != other[name]


def test_files_and_counts(data):
    stats = data["stats"]
    assert json.loads((data["dir"] / "stats.json").read_text()) == stats
    per_split = {s: sum(stats["problems"][s].values()) for s in ("sft", "align", "test")}
    assert sum(per_split.values()) == N
    assert per_split["test"] == len(data["test"]) == 4 * round(0.15 * N / 4)
    assert per_split["align"] == len(data["align"])
    # Every SFT problem has a public demo; a teacher_frac share also has the teacher demo.
    assert stats["sft_records"] == {"public": per_split["sft"],
                                    "teacher": round(0.1 * per_split["sft"])}
    assert len(data["sft"]) == per_split["sft"] + round(0.1 * per_split["sft"])


def test_held_out_split_has_every_family(data):
    assert {r.task for r in data["test"]} == set(FAMILIES)
    assert all(n >= 10 for n in data["stats"]["problems"]["test"].values())


def test_problem_ids_are_disjoint_across_splits(data):
    sft = {r.extra["problem_id"] for r in data["sft"]}
    align = {r.id for r in data["align"]}
    test = {r.id for r in data["test"]}
    assert not (sft & align) and not (sft & test) and not (align & test)
    assert len(sft) + len(align) + len(test) == N
    # And no held-out question/image pair appears verbatim in training data.
    seen = {(r.question, r.images[0].load().tobytes()) for r in data["sft"] + data["align"]}
    assert not any((r.question, r.images[0].load().tobytes()) in seen for r in data["test"])


def test_teacher_responses_are_valid_and_correct(data):
    teachers = [r.response for r in data["sft"] if r.extra["style"] == "teacher"]
    truths = [r.ground_truth for r in data["sft"] if r.extra["style"] == "teacher"]
    for r in data["align"] + data["test"]:
        teachers.append(r.extra["teacher_response"])
        truths.append(r.ground_truth)
        assert r.extra["teacher_caption"] + "\n" + r.extra["teacher_cot"] == \
            r.extra["teacher_response"]
        assert r.extra["teacher_caption"].startswith("<caption>")
        assert r.extra["teacher_caption"].endswith("</caption>")
        assert r.extra["teacher_cot"].startswith("<think>")
        assert r.extra["teacher_cot"].endswith("</answer>")
    assert len(teachers) > 100
    for text, truth in zip(teachers, truths):
        assert is_format_valid(text, strict=True), text
        assert extract_answer(text) == truth
    mean = sum(map(len, teachers)) / len(teachers)
    assert 150 <= mean <= 400 and max(map(len, teachers)) < 600


def test_public_responses_are_valid_and_wrong_at_the_configured_rate(data):
    publics = [(r.response, r.ground_truth, r.extra["public_error"])
               for r in data["sft"] if r.extra["style"] == "public"]
    publics += [(r.extra["public_response"], r.ground_truth, r.extra["public_error"])
                for r in data["align"] + data["test"]]
    assert len(publics) == N
    wrong = 0
    for text, truth, error in publics:
        assert is_format_valid(text, strict=True), text
        is_wrong = extract_answer(text) != truth
        assert is_wrong == (error != "none")  # every slip changes the answer, and only slips
        wrong += is_wrong
    assert abs(wrong / N - 0.15) < 0.06
    assert data["stats"]["public_errors"]["observed_rate"] == round(wrong / N, 4)
    assert data["stats"]["public_errors"]["perception"] > 5
    assert data["stats"]["public_errors"]["reasoning"] > 5


def test_public_style_differs_from_teacher(data):
    # Same problems, different distribution: the public demo is never the teacher's text.
    for r in data["align"]:
        assert r.extra["public_response"] != r.extra["teacher_response"]
        assert not parse_response(r.extra["public_response"]).caption.startswith("- Style:")


def test_error_rate_extremes(tmp_path):
    synthesize(tmp_path / "all", 40, seed=1, public_error_rate=1.0, test_frac=0.5,
               align_frac=0.5)
    synthesize(tmp_path / "none", 40, seed=1, public_error_rate=0.0, test_frac=0.5,
               align_frac=0.5)
    for name, want_wrong in (("all", True), ("none", False)):
        recs = read_records(tmp_path / name / "align.parquet") + \
            read_records(tmp_path / name / "test.parquet")
        assert len(recs) == 40
        assert all((extract_answer(r.extra["public_response"]) != r.ground_truth) == want_wrong
                   for r in recs)
    kinds = {r.extra["public_error"] for r in read_records(tmp_path / "all" / "test.parquet")}
    assert kinds == {"perception", "reasoning"}


def test_images_have_configured_size_and_families_restrict(data, tmp_path):
    assert {r.images[0].load().size for r in data["test"][:20]} == {(96, 96)}
    stats = synthesize(tmp_path / "small", 24, seed=0, image_size=64,
                       families=("chart", "digits"))
    recs = read_records(tmp_path / "small" / "sft.json") + \
        read_records(tmp_path / "small" / "test.parquet")
    assert {r.task for r in recs} == {"chart", "digits"}
    assert {im.size for r in recs for im in r.load_images()} == {(64, 64)}
    assert set(stats["problems"]["test"]) == {"chart", "digits"}


def test_letter_answers_and_every_family_present(data):
    everything = data["sft"] + data["align"] + data["test"]
    letters = [r for r in everything if r.ground_truth in ("A", "B", "C", "D")]
    assert len(letters) > 20
    assert all("Options: (A)" in r.question for r in letters)
    assert {r.task for r in letters} >= {"count", "chart", "digits"}
    numeric = [r for r in everything if r.ground_truth.isdigit()]
    assert len(numeric) > len(letters)


def test_caption_describes_every_object():
    for i, family in enumerate(FAMILIES * 10):
        problem, _ = make_problem(i, 7, family)
        caption = parse_response(teacher_response(problem)).caption
        bullets = [line for line in caption.splitlines() if line.startswith("- ")]
        assert len(bullets) == len(problem.items) + 1  # a style line, then one per object


def test_chart_scale_and_drawing():
    # A bar of height h covers h units of size/6 px from the bottom of its column.
    problem, _ = make_problem(2, 0, "chart")
    img = Image.open(__import__("io").BytesIO(problem.image)).convert("RGB")
    for bar in problem.items:
        x = bar.col * 32 + 16
        painted = [y for y in range(96) if img.getpixel((x, y)) not in
                   ((255, 255, 255), (205, 205, 205), (0, 0, 0))]
        assert min(painted) == 96 - 16 * bar.value


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown families"):
        synthesize(tmp_path, 10, seed=0, families=("count", "maze"))
    with pytest.raises(ValueError, match="public_error_rate"):
        synthesize(tmp_path, 10, seed=0, public_error_rate=1.5)


# Written by the code before the scene column and --public-style existed (n 120, seed 5).
BEFORE = {"sft.json": "b138486d7231f3e1bd9ecc8a628bafbd318a9feafb489c8fda90301e587d79a9",
          "stats.json": "7ebd2113e897300b652f0942dc75e7eaf74414a4db860c2a028e64035461122b",
          "align": "87de97f30676739890beca0c64afb69b95b5635a4e33efed754c2b78fdaa2027",
          "test": "08f16f837fb0999d957b4f2dfc706fed0a7cc6f30d8e4b4dcc477794a5ef20e8",
          "images": "3cf4df2a46fb9a93ac30f697bf4947f09d8cbf922277bf6f9841744e67292ce1"}


def test_default_output_is_unchanged_apart_from_the_scene_column(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    synthesize(tmp_path, 120, 5)
    got = {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("sft.json", "stats.json")}
    for split in ("align", "test"):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert "scene" in table.column_names
        got[split] = hashlib.sha256(repr(table.drop(["scene"]).to_pylist()).encode()).hexdigest()
    images = b"".join(p.read_bytes() for p in sorted((tmp_path / "images").iterdir()))
    got["images"] = hashlib.sha256(images).hexdigest()
    assert got == BEFORE


def test_teacher_style_public_demos_differ_from_the_teacher_only_by_slips(tmp_path):
    varied = synthesize(tmp_path / "v", 200, 4, public_error_rate=0.4)
    stats = synthesize(tmp_path / "t", 200, 4, public_error_rate=0.4, public_style="teacher")
    assert stats["public_style"] == "teacher" and "public_style" not in varied
    assert stats["public_errors"] == varied["public_errors"]   # the same problems get the same slips
    rows = read_records(tmp_path / "t" / "align.parquet") + read_records(tmp_path / "t" / "test.parquet")
    errors = {"none": 0, "reasoning": 0, "perception": 0}
    for r in rows:
        pub, teacher = r.extra["public_response"], r.extra["teacher_response"]
        errors[r.extra["public_error"]] += 1
        if r.extra["public_error"] == "none":
            assert pub == teacher
            continue
        assert pub != teacher and extract_answer(pub) != r.ground_truth
        same_caption = parse_response(pub).caption == parse_response(teacher).caption
        assert same_caption == (r.extra["public_error"] == "reasoning")   # a reasoning slip keeps the caption
        assert parse_response(pub).caption.startswith("- Style:")
    assert min(errors.values()) > 3
    sft = read_records(tmp_path / "t" / "sft.json")
    assert all(r.extra["style"] in ("public", "teacher") for r in sft)
    # the alignment pool is teacher-only: its demonstrations are the teacher's, never a public one
    for r in read_records(tmp_path / "t" / "align.parquet"):
        assert r.response is None and r.extra["teacher_response"].startswith("<caption>\n- Style:")


def test_cli_passes_public_style_and_teacher_frac(tmp_path):
    from prism_rl.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "60", "--public-style", "teacher",
                 "--teacher-frac", "1"]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["public_style"] == "teacher"
    assert stats["sft_records"]["teacher"] == stats["sft_records"]["public"]
    with pytest.raises(ValueError, match="public_style"):
        synthesize(tmp_path / "bad", 10, public_style="fancy")
