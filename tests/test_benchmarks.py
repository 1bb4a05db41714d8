"""Benchmark loaders, rule scoring, the LLM judge fallback, the runs table, and an end-to-end
evaluation with the tiny model (interrupted, then resumed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from prism_rl.config import ConfigError
from prism_rl.data.records import IMAGE_PLACEHOLDER, BadRecords, DataError
from prism_rl.eval import run_benchmark as R
from prism_rl.eval.benchmark_scoring import judge_rows, score_response, summarize_benchmark
from prism_rl.eval.benchmark_table import BENCHMARKS, get_benchmark
from prism_rl.eval.judge import Judge, parse_verdict
from prism_rl.eval.loaders import ROW_READERS, load_benchmark, mathvista_query, split_letter_options
from prism_rl.eval.report import collect_results, results_csv_rows, write_report
from prism_rl.eval.run_benchmark import evaluate_benchmark
from prism_rl.format import SYSTEM_PROMPT, make_response

from conftest import png_bytes

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def img(color: str = "red") -> dict:
    """A Hugging Face parquet image struct."""
    return {"bytes": png_bytes(color), "path": f"{color}.png"}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user(rec) -> str:
    return rec.messages[1]["content"]


def check_common(rec) -> None:
    assert rec.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert user(rec).count(IMAGE_PLACEHOLDER) == len(rec.images)
    for im in rec.load_images():
        assert im.size[0] > 0


def resp(answer: str) -> str:
    return make_response("- a figure", "reasoning", answer)


# --------------------------------------------------------------------------- settings


def test_settings_table_follows_the_spec():
    assert list(BENCHMARKS) == ["mathvista", "mathverse", "mathvision", "wemath", "mmmu",
                                "mmmu_pro", "hallusionbench"]
    for name, spec in BENCHMARKS.items():
        assert 8192 <= spec.max_new_tokens <= 49152, name
        if name == "hallusionbench":
            assert spec.temperature == 0.0  # greedy
        else:
            assert (spec.temperature, spec.top_p) == (1.0, 0.7)
    assert BENCHMARKS["mathvision"].max_new_tokens == 49152
    assert get_benchmark("MMMU-Pro").name == "mmmu_pro"
    assert get_benchmark("HallusionBench").name == "hallusionbench"
    assert get_benchmark("Math-Vision").name == "mathvision"
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("gsm8k")
    assert set(ROW_READERS) == set(BENCHMARKS)  # every benchmark in the table can be read


def test_loaders_import_no_model_code():
    """Reading a benchmark must not pull in torch, transformers, models/ or rollout/."""
    code = ("import sys, prism_rl.eval.loaders\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
            "         or m.startswith(('prism_rl.models', 'prism_rl.rollout'))]\n"
            "assert 'torch' not in sys.modules, heavy\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_src_env())


@pytest.mark.parametrize("module", ["benchmark_table", "benchmark_prompts", "benchmark_metrics", "release_files",
                                    "loaders", "benchmark_scoring", "run_benchmark", "report", "judge", "sampling",
                                    "evaluate"])
def test_eval_modules_import_on_their_own(module):
    """Each module imports first in a fresh process: no import cycle hides behind import order."""
    subprocess.run([sys.executable, "-c", f"import prism_rl.eval.{module}"], check=True, env=_src_env())


def _src_env() -> dict:
    """The environment with this checkout's ``src`` first on the path (as the tests import it)."""
    import prism_rl

    src = str(Path(prism_rl.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------- loaders


# MathVista testmini rows as the release has them (GitHub data/testmini.json and, for the
# query, data/query.json; the HF parquet carries the same fields plus ``query``)
MV_HINT_MC = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
MV_HINT_INT = ("Hint: Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.")
MV_HINT_F1 = ("Hint: Please answer the question requiring a floating-point number with one decimal place and "
              "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
MV_HINT_F2 = ("Hint: Please answer the question requiring a floating-point number with two decimal places and "
              "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.")
MV_META = {"split": "testmini", "language": "english", "img_width": 322, "img_height": 245, "source": "Geometry3K",
           "category": "math-targeted-vqa", "task": "geometry problem solving", "context": "geometry diagram",
           "grade": "high school", "skills": ["geometry reasoning", "algebraic reasoning"]}
MV_ROWS = [
    {"pid": "2", "question": "what is the total volume of the measuring cup?", "image": "images/2.jpg",
     "choices": None, "unit": "g", "precision": None, "answer": "1000", "question_type": "free_form",
     "answer_type": "integer", "metadata": {**MV_META, "task": "visual question answering"},
     "query": MV_HINT_INT + "\nQuestion: what is the total volume of the measuring cup? (Unit: g)"},
    {"pid": "5", "question": "Find $m\\angle H$", "image": "images/5.jpg", "choices": ["97", "102", "107", "122"],
     "unit": None, "precision": None, "answer": "97", "question_type": "multi_choice", "answer_type": "text",
     "metadata": MV_META,
     "query": MV_HINT_MC + "\nQuestion: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"},
    # free form with a unit and a precision: both must reach the prompt
    {"pid": "901", "question": "What is the length of side AB?", "image": "images/901.jpg", "choices": None,
     "unit": "cm", "precision": 1.0, "answer": "7.5", "question_type": "free_form", "answer_type": "float",
     "metadata": MV_META, "query": MV_HINT_F1 + "\nQuestion: What is the length of side AB? (Unit: cm)"},
    {"pid": "902", "question": "What is the slope at x = 1?", "image": "images/902.jpg", "choices": None,
     "unit": None, "precision": 2.0, "answer": "1.45", "question_type": "free_form", "answer_type": "float",
     "metadata": {**MV_META, "task": "figure question answering"},
     "query": MV_HINT_F2 + "\nQuestion: What is the slope at x = 1?"},
]


def test_mathvista_prompt_is_the_release_query(tmp_path):
    """The prompt is MathVista's own query (hint with precision, unit, choices), read from the
    parquet's ``query`` or rebuilt in the same words where a file has none (the GitHub JSON)."""
    colors = ["red", "blue", "green", "white"]
    rows = [{**r, "decoded_image": img(c)} for r, c in zip(MV_ROWS, colors)]
    write_parquet(tmp_path / "MathVista" / "data" / "testmini-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "MathVista" / "data" / "test-00000-of-00002.parquet", rows[:1])  # not read
    recs = load_benchmark("mathvista", tmp_path / "MathVista")
    assert [r.id for r in recs] == ["2", "5", "901", "902"]
    for rec, row in zip(recs, MV_ROWS):
        assert user(rec) == "<image>\n" + row["query"]
        check_common(rec)
    assert "(Unit: cm)" in user(recs[2]) and "one decimal place" in user(recs[2])
    integer, mc, cm, fl = recs
    assert integer.ground_truth == "1000" and fl.ground_truth == "1.45" and cm.ground_truth == "7.5"
    assert mc.ground_truth == "A" and mc.extra["accepted"] == ["(A) 97"] and mc.extra["options"] == MV_ROWS[1]["choices"]
    assert mc.task == "mathvista/geometry problem solving"
    # the GitHub release: a JSON dict keyed by pid without ``query``, image paths relative to the file
    (tmp_path / "gh" / "images").mkdir(parents=True)
    for r in MV_ROWS:
        (tmp_path / "gh" / r["image"]).write_bytes(png_bytes())
    no_query = {r["pid"]: {k: v for k, v in r.items() if k != "query"} for r in MV_ROWS}
    (tmp_path / "gh" / "testmini.json").write_text(json.dumps(no_query))
    gh = load_benchmark("mathvista", tmp_path / "gh" / "testmini.json")
    assert [user(r) for r in gh] == ["<image>\n" + r["query"] for r in MV_ROWS]  # rebuilt word for word
    assert gh[1].ground_truth == "A" and gh[0].images[0].path == "images/2.jpg"
    for r in gh:
        check_common(r)
    # a precision the release never words (3) and a float without one still say what is asked
    odd = mathvista_query({"question": "Q?", "answer_type": "float", "precision": 3, "unit": "kg"}, [])
    assert odd.startswith("Hint: ") and "3 decimal places" in odd and odd.endswith("Question: Q? (Unit: kg)")
    assert "floating-point number" in mathvista_query({"question": "Q?", "answer_type": "float"}, [])


def test_mathverse_parquet_versions(tmp_path):
    q_mc = ("As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length "
            "of BC is ()\nChoices:\nA:2\nB:2\u221a{3}\nC:\u221a{3}\nD:2\u221a{2}")
    base = {"problem_index": "1", "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry",
                                                "subfield": "Length"}, "question_for_eval": q_mc}
    hint = "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D."
    rows = [
        dict(base, sample_index="1", problem_version="Text Dominant", question=q_mc, image=img(), answer="C",
             question_type="multi-choice", query_wo=f"{hint}\nQuestion: {q_mc}", query_cot="..."),
        dict(base, sample_index="5", problem_version="Vision Only", question="", image=img("blue"), answer="C",
             question_type="multi-choice", query_wo="According to the question shown in the image, please directly "
             "answer the question and provide the correct option letter, e.g., A, B, C, D.", query_cot="..."),
        dict(base, sample_index="6", problem_version="Text Only", question="What is 2 + 3?", image=None,
             answer="5", question_type="free-form", query_wo="Please directly answer the question and provide the "
             "final value, e.g., 1, 2.5, 300.\nQuestion: What is 2 + 3?", query_cot="...",
             question_for_eval="What is 2 + 3?"),
    ]
    write_parquet(tmp_path / "testmini.parquet", rows)
    write_parquet(tmp_path / "testmini_text_only.parquet", rows[2:])  # another config: not read
    mc, vo, to = load_benchmark("mathverse", tmp_path)
    assert user(mc) == f"<image>\n{hint}\nQuestion: {q_mc}"
    assert mc.ground_truth == "C" and mc.extra["accepted"] == ["(C) \u221a{3}"]
    assert mc.task == "mathverse/Text Dominant"
    assert user(vo).startswith("<image>\nAccording to the question shown in the image, please directly answer")
    assert vo.ground_truth == "C" and vo.task == "mathverse/Vision Only" and vo.extra["judge_question"] == q_mc
    assert user(to) == ("Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.\n"
                        "Question: What is 2 + 3?") and to.images == []
    for r in (mc, vo, to):
        check_common(r)


def test_mathvision_github_jsonl_fixture():
    recs = load_benchmark("mathvision", FIX / "mathvision")  # finds data/testmini.jsonl
    assert [r.id for r in recs] == ["4", "6", "39"]
    free, letters, texts = recs
    assert user(free).endswith("\nHow many different digits can you find in this picture?\n<image1>")
    assert free.ground_truth == "6" and free.task == "mathvision/counting"
    assert user(letters).endswith("<image1>")  # options that are only letters: drawn in the image
    assert letters.ground_truth == "D" and letters.extra["accepted"] == ["D"]
    assert user(texts).endswith("\n(A) red\n(B) blue\n(C) green\n(D) Yellow\n(E) This cannot be worked out for certain.")
    assert texts.ground_truth == "A" and texts.extra["accepted"] == ["(A) red"]
    # "images/4.png" is relative to the repository root, the parent of data/
    assert Path(free.images[0].base_dir) == FIX / "mathvision"
    for r in recs:
        check_common(r)


def test_wemath_json_fixture_and_option_parsing():
    recs = load_benchmark("wemath", FIX / "wemath")
    assert [r.id for r in recs] == ["2steps_1/2steps_1", "2steps_1/2steps_2", "2steps_1/2steps_multi",
                                    "3steps_1/3steps_1", "3steps_1/3steps_2", "3steps_1/3steps_3",
                                    "3steps_1/3steps_multi"]
    assert recs[0].extra["accepted"] == ["(A) 1 cm"] and recs[0].extra["options"][-1] == "No correct answer"
    assert [r.ground_truth for r in recs] == ["A", "B", "C", "C", "B", "B", "B"]
    assert recs[2].extra["meta"] == {"ID": "2steps_1", "key": "2steps_multi",
                                     "knowledge concept": "Circumference of Circles"}
    for r in recs:
        check_common(r)
    assert split_letter_options("A. 3, 5, 4; B. 3, 50, 40; C. 300, 50, 40; D. 30, 50, 40.; E. No correct answer") == [
        "3, 5, 4", "3, 50, 40", "300, 50, 40", "30, 50, 40.", "No correct answer"]
    assert split_letter_options("A. F;    B. D;    C. B") == ["F", "D", "B"]
    assert split_letter_options("free text without letters") is None
    assert split_letter_options("A. x; C. y") is None  # letters must run A, B, C, ...


def test_mmmu_interleaved_images(tmp_path):
    rows = [
        {"id": "validation_Art_Theory_1", "question": "Which painting <image 1> shares the style of <image 2>?",
         "options": "['<image 3>', 'Monet', 'Degas']", "explanation": "", "image_1": img("red"),
         "image_2": img("blue"), "image_3": img("green"), "image_4": None, "image_5": None, "image_6": None,
         "image_7": None, "img_type": "['Paintings']", "answer": "A", "topic_difficulty": "Easy",
         "question_type": "multiple-choice", "subfield": "Art"},
        {"id": "validation_Math_2", "question": "Solve for x in <image 1>; compare with <image 1>.",
         "options": "[]", "explanation": "", "image_1": img("red"), "image_2": img("blue"), "image_3": None,
         "image_4": None, "image_5": None, "image_6": None, "image_7": None, "img_type": "[]",
         "answer": "['24/7', '3.429']", "topic_difficulty": "Hard", "question_type": "open", "subfield": "Algebra"},
    ]
    write_parquet(tmp_path / "MMMU" / "Art_Theory" / "validation-00000-of-00001.parquet", rows[:1])
    write_parquet(tmp_path / "MMMU" / "Math" / "validation-00000-of-00001.parquet", rows[1:])
    write_parquet(tmp_path / "MMMU" / "Math" / "dev-00000-of-00001.parquet", rows[1:])  # not read
    mc, op = load_benchmark("mmmu", tmp_path / "MMMU")
    assert user(mc) == ("Which painting <image> shares the style of <image>?\n(A) <image>\n(B) Monet\n"
                        "(C) Degas\n\nAnswer with the option's letter from the given choices directly.")
    assert [len(i.data) for i in mc.images] == [len(png_bytes(c)) for c in ("red", "blue", "green")]
    assert mc.ground_truth == "A" and mc.extra["accepted"] == ["A"]  # option A is an image
    assert mc.task == "mmmu/Art_Theory"
    # image 1 mentioned twice: placed once; image 2 never mentioned: placed first
    assert user(op) == ("<image>\nSolve for x in <image>; compare with [image 1].\n"
                        "Answer the question using a single word or phrase.")
    assert op.images[0].data == png_bytes("blue") and op.images[1].data == png_bytes("red")
    assert op.ground_truth == "24/7" and op.extra["accepted"] == ["24/7", "3.429"]
    for r in (mc, op):
        check_common(r)


def test_mmmu_pro_standard_and_vision(tmp_path):
    opts = [f"option {i}" for i in range(10)]
    std = {"id": "test_History_1", "question": "Who made <image 1>?", "options": str(opts), "explanation": "",
           "image_1": img(), "image_2": None, "image_3": None, "image_4": None, "image_5": None, "image_6": None,
           "image_7": None, "img_type": "", "answer": "J", "topic_difficulty": "Medium", "subject": "History"}
    vis = {"id": "test_History_1", "image": img("blue"), "options": str(opts), "answer": "C", "subject": "History"}
    root = tmp_path / "MMMU_Pro"
    write_parquet(root / "standard (10 options)" / "test-00000-of-00001.parquet", [std])
    write_parquet(root / "standard (4 options)" / "test-00000-of-00001.parquet", [dict(std, answer="A")])
    write_parquet(root / "vision" / "test-00000-of-00001.parquet", [vis])
    s, v = load_benchmark("mmmu_pro", root)
    assert (s.id, s.task, s.ground_truth) == ("standard/test_History_1", "mmmu_pro/standard", "J")
    assert user(s).startswith("Who made <image>?\nA. option 0\n")
    assert "J. option 9\nAnswer the preceding multiple choice question." in user(s)
    assert (v.id, v.task, v.ground_truth) == ("vision/test_History_1", "mmmu_pro/vision", "C")
    assert user(v).startswith("<image>\nWrite out the multiple-choice question in the image and then solve it.")
    assert v.extra["accepted"] == ["(C) option 2"] and "(J) option 9" in v.extra["judge_question"]
    for r in (s, v):
        check_common(r)


def test_hallusionbench_json_fixture_and_parquet(tmp_path):
    recs = load_benchmark("hallusionbench", FIX / "hallusionbench")
    assert [r.id for r in recs] == ["VD_illusion_0_0_0", "VD_illusion_0_0_1", "VD_illusion_0_1_0"]  # no VS text-only
    assert [r.ground_truth for r in recs] == ["Yes", "No", "No"]
    assert user(recs[0]) == "<image>\nIs the right orange circle the same size as the left orange circle?"
    assert recs[0].task == "hallusionbench/VD"
    for r in recs:
        check_common(r)
    row = {"category": "VS", "subcategory": "chart", "visual_input": "1", "set_id": "3", "figure_id": "1",
           "sample_note": "", "question_id": "0", "question": "Is the bar blue?", "gt_answer_details": "",
           "gt_answer": "1", "filename": "./hallusion_bench/VS/chart/3_1.png", "image": img("blue")}
    write_parquet(tmp_path / "data" / "image-00000-of-00001.parquet", [row])
    write_parquet(tmp_path / "data" / "non_image-00000-of-00001.parquet", [dict(row, visual_input="0", image=None)])
    (p,) = load_benchmark("hallusionbench", tmp_path)
    assert (p.id, p.ground_truth) == ("VS_chart_3_1_0", "Yes") and p.images[0].data == png_bytes("blue")


# --------------------------------------------------------------------------- bad records


def test_bad_records_name_file_index_field_or_are_skipped(tmp_path):
    good = {"pid": "1", "question": "Q?", "decoded_image": img(), "choices": ["a", "b"], "answer": "b",
            "question_type": "multi_choice", "answer_type": "text"}
    f = write_parquet(tmp_path / "mv.parquet", [good, dict(good, pid="2", answer="c"),
                                                 dict(good, pid="3", decoded_image=None, image=None)])
    with pytest.raises(DataError, match=r"mv\.parquet, record 1, field 'answer': answer 'c' is not one of the"):
        load_benchmark("mathvista", f)
    bad = BadRecords()
    recs = load_benchmark("mathvista", f, skip_bad=True, bad=bad)
    assert [r.id for r in recs] == ["1"] and bad.count == 2
    assert "record 2" in bad.reasons[1] and "field 'decoded_image': missing image" in bad.reasons[1]
    # a missing image file
    rows = json.loads((FIX / "wemath" / "testmini.json").read_text())
    rows[1]["image_path"] = "2steps/image/nope.png"
    (tmp_path / "2steps").symlink_to(FIX / "wemath" / "2steps")
    (tmp_path / "wm.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"wm\.json, record 1, field 'image_path': image file not found"):
        load_benchmark("wemath", tmp_path / "wm.json")
    # MMMU: a mentioned image that is absent; HallusionBench: a bad label; a broken JSONL line
    mm = {"id": "validation_Art_1", "question": "See <image 2>", "options": "['x', 'y']", "answer": "A",
          "image_1": img(), "image_2": None, "question_type": "multiple-choice"}
    with pytest.raises(DataError, match=r"record 0, field 'image_2': mentioned in the text but missing"):
        load_benchmark("mmmu", write_parquet(tmp_path / "mm.parquet", [mm]))
    hb = json.loads((FIX / "hallusionbench" / "HallusionBench.json").read_text())
    hb[0]["gt_answer"] = "2"
    (tmp_path / "hallusion_bench").symlink_to(FIX / "hallusionbench" / "hallusion_bench")
    (tmp_path / "HallusionBench.json").write_text(json.dumps(hb))
    with pytest.raises(DataError, match=r"record 0, field 'gt_answer': expected 0 or 1"):
        load_benchmark("hallusionbench", tmp_path / "HallusionBench.json")
    lines = (FIX / "mathvision" / "data" / "testmini.jsonl").read_text().splitlines()
    (tmp_path / "data").mkdir()
    (tmp_path / "images").symlink_to(FIX / "mathvision" / "images")
    (tmp_path / "data" / "t.jsonl").write_text(lines[0] + "\n{not json\n" + lines[2] + "\n")
    bad = BadRecords()
    recs = load_benchmark("mathvision", tmp_path / "data" / "t.jsonl", skip_bad=True, bad=bad)
    assert [r.id for r in recs] == ["4", "39"] and "invalid JSON" in bad.reasons[0]
    assert [r.id for r in load_benchmark("mathvision", FIX / "mathvision", limit=2)] == ["4", "6"]
    with pytest.raises(DataError, match="no mathvision test files found"):
        load_benchmark("mathvision", FIX / "mathvision", split="test")  # the fixture has testmini only
    (tmp_path / "data" / "test.jsonl").write_text(lines[1] + "\n")
    assert [r.id for r in load_benchmark("mathvision", tmp_path, split="test")] == ["6"]


# --------------------------------------------------------------------------- rule scoring


@pytest.mark.parametrize("name,path,idx,answer,expected", [
    ("mathvision", FIX / "mathvision", 0, "6", 1.0),
    ("mathvision", FIX / "mathvision", 0, "5", 0.0),
    ("mathvision", FIX / "mathvision", 1, "(D)", 1.0),
    ("mathvision", FIX / "mathvision", 1, "The answer is D.", 1.0),
    ("mathvision", FIX / "mathvision", 1, "E", 0.0),
    ("mathvision", FIX / "mathvision", 2, "A", 1.0),
    ("mathvision", FIX / "mathvision", 2, "Red", 1.0),    # the correct option's text
    ("mathvision", FIX / "mathvision", 2, "blue", 0.0),   # another option's text
    ("wemath", FIX / "wemath", 2, "C. 6.28", 1.0),
    ("wemath", FIX / "wemath", 2, "6.28", 1.0),
    ("wemath", FIX / "wemath", 2, "3.14", 0.0),
    ("wemath", FIX / "wemath", 1, "2\\pi", 1.0),
    ("hallusionbench", FIX / "hallusionbench", 0, "Yes.", 1.0),
    ("hallusionbench", FIX / "hallusionbench", 0, "yes", 1.0),
    ("hallusionbench", FIX / "hallusionbench", 1, "Yes", 0.0),
    ("hallusionbench", FIX / "hallusionbench", 1, "No", 1.0),
])
def test_rule_scoring(name, path, idx, answer, expected):
    rec = load_benchmark(name, path)[idx]
    row = score_response(rec, resp(answer), tokens=12)
    assert (row["acc"], row["rule_acc"], row["format"]) == (expected, expected, 1.0)
    assert row["answer"] == answer and row["judge"] == ("not_needed" if expected else "off")


def test_rule_scoring_malformed_and_missing_answers():
    rec = load_benchmark("mathvision", FIX / "mathvision")[0]
    row = score_response(rec, "I think so. <answer>6</answer> trailing text")
    assert (row["acc"], row["format"], row["answer"]) == (1.0, 0.0, "6")  # answer read, format invalid
    row = score_response(rec, "The answer is 6 but no tags", finish="length")
    assert (row["acc"], row["format"], row["answer"], row["finish"]) == (0.0, 0.0, None, "length")


# --------------------------------------------------------------------------- judge

SECRET = "sk-test-do-not-leak-123"


@pytest.fixture(scope="module")
def judge_server():
    """A tiny OpenAI-compatible judge: "Correct." only when the answer is "six"."""
    app = FastAPI()
    seen: list[dict] = []

    def reply(text: str) -> dict:
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        seen.append({"auth": request.headers.get("authorization"), "prompt": prompt, "model": body["model"]})
        return reply("Correct." if "Student's final answer: six\n" in prompt else "Incorrect")

    @app.post("/fail/v1/chat/completions")
    async def fail(request: Request):
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_parse_verdict():
    assert parse_verdict("Correct.") is True
    assert parse_verdict("**Incorrect**") is False
    assert parse_verdict("The answer is correct") is True
    assert parse_verdict("not correct") is False
    assert parse_verdict("<think>it might be correct</think>\nincorrect") is False
    assert parse_verdict("<think>still thinking about whether it is correct") is None
    assert parse_verdict("1") is True and parse_verdict("0") is False
    assert parse_verdict("") is None and parse_verdict("maybe?") is None


def test_judge_flips_only_rule_wrong_answers(judge_server, monkeypatch):
    url, seen = judge_server
    seen.clear()
    monkeypatch.setenv("PRISM_JUDGE_API_KEY", SECRET)
    judge = Judge(f"{url}/v1", "judge-32b", timeout=10)
    assert SECRET not in repr(judge)
    rec = load_benchmark("mathvision", FIX / "mathvision")[0]  # ground truth "6"
    records = {rec.id: rec}
    rows = [score_response(rec, resp(a)) for a in ("six", "6", "7")] + [score_response(rec, "no tags")]
    judge_rows(rows, records, judge)
    assert [r["acc"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["rule_acc"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert [r["judge"] for r in rows] == ["correct", "not_needed", "incorrect", "no_answer"]
    assert len(seen) == 2 and judge.calls == 2  # never asked about the rule-correct "6"
    assert all(s["auth"] == f"Bearer {SECRET}" and s["model"] == "judge-32b" for s in seen)
    assert "Reference answer: 6\n" in seen[0]["prompt"] and "How many different digits" in seen[0]["prompt"]
    s = summarize_benchmark("mathvision", rows)
    assert (s["accuracy"], s["rule_accuracy"], s["judged"], s["judge_flipped"], s["judge_failed"]) == (
        0.5, 0.25, 2, 1, 0)
    assert SECRET not in json.dumps(rows) + json.dumps(s)


def test_failing_judge_is_reported_not_fatal(judge_server, monkeypatch):
    url, _ = judge_server
    monkeypatch.setenv("PRISM_JUDGE_API_KEY", SECRET)
    rec = load_benchmark("mathvision", FIX / "mathvision")[0]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for base in (f"{url}/fail/v1", f"http://127.0.0.1:{dead}/v1"):
        judge = Judge(base, "judge-32b", timeout=5, max_retries=0)
        rows = [score_response(rec, resp("six")), score_response(rec, resp("6"))]
        judge_rows(rows, {rec.id: rec}, judge)
        assert [r["acc"] for r in rows] == [0.0, 1.0]
        assert rows[0]["judge"] == "error" and rows[0]["judge_error"]
        assert SECRET not in rows[0]["judge_error"]
        s = summarize_benchmark("mathvision", rows)
        assert (s["judged"], s["judge_failed"], s["accuracy"]) == (0, 1, 0.5)
        assert judge.failures == 1


def test_resume_with_a_judge_judges_earlier_unjudged_rows(judge_server, tmp_path, monkeypatch):
    """Samples made without a judge (or while it was down) are judged on a later run, not regenerated."""
    url, seen = judge_server
    seen.clear()
    recs = load_benchmark("mathvision", FIX / "mathvision")
    rows = [score_response(recs[0], resp("six")), score_response(recs[1], resp("D")),
            score_response(recs[2], resp("blue"))]
    rows[2]["judge"] = "error"  # the judge failed on the first run
    out = tmp_path / "run" / "mathvision"
    out.mkdir(parents=True)
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(R, "_load_model", lambda *a: pytest.fail("nothing to generate"))
    s = evaluate_benchmark("mathvision", FIX / "mathvision", "some/model", tmp_path / "run",
                           judge=Judge(f"{url}/v1", "judge-32b", timeout=10))
    assert (s["generated_now"], s["rejudged"], s["judged"], s["judge_flipped"]) == (0, 2, 2, 1)
    assert s["accuracy"] == pytest.approx(2 / 3) and len(seen) == 2
    after = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["judge"] for r in after] == ["correct", "not_needed", "incorrect"]
    again = evaluate_benchmark("mathvision", FIX / "mathvision", "some/model", tmp_path / "run",
                               judge=Judge(f"{url}/v1", "judge-32b", timeout=10))
    assert again["rejudged"] == 0 and len(seen) == 2  # verdicts are kept


# --------------------------------------------------------------------------- summaries and report


def test_benchmark_specific_scores():
    wm = load_benchmark("wemath", FIX / "wemath")[:3]
    rows = [score_response(r, resp(a)) for r, a in zip(wm, ["A", "B", "D"])]  # steps right, multi wrong
    s = summarize_benchmark("wemath", rows)
    assert s["wemath"]["problems"] == 1 and s["wemath"]["IG"] == 1
    assert s["wemath"]["score_loose"] == s["wemath"]["score_strict"] == s["accuracy"] == 0.5
    hb = load_benchmark("hallusionbench", FIX / "hallusionbench")
    rows = [score_response(r, resp(a)) for r, a in zip(hb, ["Yes", "Yes", "No"])]
    s = summarize_benchmark("hallusionbench", rows)["hallusionbench"]
    assert s["aAcc"] == pytest.approx(2 / 3)
    assert s["qAcc"] == 0.5  # question 0 right on both figures; question 1 wrong
    assert s["fAcc"] == 0.5  # figure 0 has a wrong answer; figure 1 all right


def test_mmmu_pro_accuracy_is_the_mean_of_its_settings():
    rows = [{"id": f"s{i}", "task": "mmmu_pro/standard", "acc": float(i < 1), "rule_acc": 0.0, "format": 1.0,
             "tokens": 3, "finish": "stop"} for i in range(4)]
    rows += [{"id": "v0", "task": "mmmu_pro/vision", "acc": 1.0, "rule_acc": 0.0, "format": 1.0, "tokens": 3,
              "finish": "stop"}]
    assert summarize_benchmark("mmmu_pro", rows)["accuracy"] == pytest.approx((0.25 + 1.0) / 2)


def _write_summary(root, run, part, summary):
    (root / run / part).mkdir(parents=True, exist_ok=True)
    (root / run / part / "summary.json").write_text(json.dumps(summary))


def test_report_tables(tmp_path):
    s = lambda acc, tok: {"accuracy": acc, "rule_accuracy": acc, "format_rate": 1.0, "mean_response_tokens": tok,
                          "n_records": 10, "judged": 1, "judge_flipped": 1, "judge_failed": 0, "model": "/m/instruct"}
    for b, acc in [("mathvista", 0.749), ("mathverse", 0.59), ("mathvision", 0.365), ("wemath", 0.707),
                   ("mmmu", 0.636), ("mmmu_pro", 0.451), ("hallusionbench", 0.682)]:
        _write_summary(tmp_path, "Instruct", b, s(acc, 1000))
    _write_summary(tmp_path, "PRISM+GRPO", "mathvision", s(0.5, 2000))
    _write_summary(tmp_path, "PRISM+GRPO", "heldout-test", {  # a held-out file: a column, not in Avg
        "overall": {"accuracy": 0.25, "format_rate": 0.9, "mean_response_tokens": 80.0, "n_prompts": 4},
        "per_task": {}, "model": "/m/prism"})
    (tmp_path / "PRISM+GRPO" / "run.json").write_text(json.dumps({"model": "/m/prism"}))
    files = write_report(tmp_path)
    md = files["md"].read_text()
    assert "| run | MVista | MVerse | MVision | WeMath | MMMU | MMMU-Pro | Hallu | held-out test | Avg |" in md
    assert "| Instruct | 74.9 | 59.0 | 36.5 | 70.7 | 63.6 | 45.1 | 68.2 | - | 59.7 |" in md  # METHOD.md section 9
    assert "| PRISM+GRPO | - | - | 50.0 | - | - | - | - | 25.0 | 50.0* |" in md
    assert "| PRISM+GRPO | - | - | 2000 | - | - | - | - | 80 | 2000 |" in md  # mean response tokens
    assert "| PRISM+GRPO | /m/prism |" in md and "| Instruct | /m/instruct |" in md
    rows = results_csv_rows(collect_results(tmp_path))
    assert rows[0] == ["run", "MVista", "MVerse", "MVision", "WeMath", "MMMU", "MMMU-Pro", "Hallu", "held-out test", "Avg"]
    assert rows[1][0] == "Instruct" and rows[1][-1] == "59.71"
    assert (tmp_path / "results.csv").read_text().splitlines()[2] == "PRISM+GRPO,,,50.00,,,,,25.00,50.00"
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["json"].read_text())["runs"]["PRISM+GRPO"]["mathvision"]["accuracy"] == 0.5
    # the summaries are the source: a removed run leaves the table; held-out only has no paper columns
    import shutil
    shutil.rmtree(tmp_path / "Instruct")
    (tmp_path / "PRISM+GRPO" / "mathvision" / "summary.json").unlink()
    md = write_report(tmp_path)["md"].read_text()
    assert "Instruct" not in md and "| run | held-out test |" in md and "| PRISM+GRPO | 25.0 |" in md


# --------------------------------------------------------------------------- end to end


def test_evaluate_benchmark_interrupted_then_resumed(tiny_model_dir, tmp_path, monkeypatch):
    from prism_rl.rollout.hf import HFEngine

    generated: list[str] = []
    real = HFEngine.generate
    state = {"calls": 0, "fail_on": 2}

    def counting(self, prompts, params, group_offset=0):
        state["calls"] += 1
        if state["calls"] == state["fail_on"]:
            raise RuntimeError("interrupted")
        assert params.max_new_tokens == 16 and params.temperature == 1.0 and params.top_p == 0.7
        generated.extend(p.record.id for p in prompts)
        return real(self, prompts, params, group_offset)

    monkeypatch.setattr(HFEngine, "generate", counting)
    run = tmp_path / "runs" / "tiny-run"
    kw = dict(max_new_tokens=16, batch_size=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_benchmark("mathvision", FIX / "mathvision", tiny_model_dir, run, **kw)
    samples = run / "mathvision" / "samples.jsonl"
    assert [json.loads(x)["id"] for x in samples.read_text().splitlines()] == ["4"]
    with samples.open("a") as fh:
        fh.write('{"id": "6", "resp')  # a torn write from the interruption
    state["fail_on"] = -1
    summary = evaluate_benchmark("mathvision", FIX / "mathvision", tiny_model_dir, run, **kw)
    assert generated == ["4", "6", "39"]  # "4" was not generated again
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["4", "6", "39"]
    assert all({"response", "answer", "acc", "format", "tokens", "judge"} <= set(r) for r in lines)
    assert all(1 <= r["tokens"] <= 16 for r in lines)
    assert (summary["n_records"], summary["generated_now"], summary["resumed"]) == (3, 2, 1)
    assert summary["settings"]["max_new_tokens"] == 16 and summary["run"] == "tiny-run"
    assert summary["model"] == str(Path(tiny_model_dir).resolve())
    assert summary["accuracy"] == pytest.approx(sum(r["acc"] for r in lines) / 3)
    assert json.loads((run / "mathvision" / "summary.json").read_text())["n_records"] == 3
    # a finished benchmark re-summarises without loading the model; the table is beside the runs
    monkeypatch.setattr(R, "_load_model", lambda *a: pytest.fail("model loaded for nothing"))
    again = evaluate_benchmark("mathvision", FIX / "mathvision", tiny_model_dir, run, **kw)
    assert again["generated_now"] == 0 and again["accuracy"] == summary["accuracy"]
    results = tmp_path / "runs"
    for f in ("results.md", "results.csv", "results.png", "results.json"):
        assert (results / f).stat().st_size > 0
    acc = f"{100 * summary['accuracy']:.2f}"
    assert (results / "results.csv").read_text().splitlines()[1:] == [f"tiny-run,,,{acc},,,,,{acc}"]
    # other settings, or another model, are refused with a message; nothing is generated
    with pytest.raises(ConfigError, match="other settings.*max_new_tokens 16 there, 8 now.*--fresh"):
        evaluate_benchmark("mathvision", FIX / "mathvision", tiny_model_dir, run, max_new_tokens=8, batch_size=1)
    with pytest.raises(ConfigError, match="holds results of model"):
        evaluate_benchmark("mathvision", FIX / "mathvision", tmp_path / "other-model", run, **kw)
    assert len(generated) == 3
