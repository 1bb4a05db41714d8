"""Each benchmark scored as the benchmark defines it (docs/BENCHMARKS.md): per benchmark, the
exact prompt built for each question type, what the judge is shown for an answer the rules call
wrong, and the headline number on hand-labelled answers against the benchmark's own formula
worked out by hand here. Rows come from the fixtures (written from each dataset card's fields)
or are written below from the same fields."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_rl.data.records import DataError
from prism_rl.eval.benchmark_scoring import judge_rows, score_response, summarize_benchmark
from prism_rl.eval.judge import JudgeResult, build_messages
from prism_rl.eval.loaders import load_benchmark
from prism_rl.eval.report import collect_results, results_markdown, summary_line, write_report
from prism_rl.format import SYSTEM_PROMPT, make_response
from test_benchmarks import MV_ROWS, img

from conftest import png_bytes

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


class RecordingJudge:
    """The judge's interface (``judge_many``): records what it is asked, answers "incorrect"."""

    def __init__(self):
        self.items: list[tuple[str, str, str]] = []

    def judge_many(self, items):
        self.items += items
        return [JudgeResult(False, "incorrect") for _ in items]


def user(rec) -> str:
    assert rec.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    return rec.messages[1]["content"]


def answered(recs, answers: list[str]) -> list[dict]:
    """Sample rows for ``answers`` given in well-formed PRISM responses, scored by the rules."""
    return [score_response(r, make_response("- a figure", "reasoning", a)) for r, a in zip(recs, answers)]


def asked(rec, answer: str) -> tuple[str, str, str]:
    """What the judge is asked about ``answer`` to ``rec`` (the rules must call it wrong)."""
    row = answered([rec], [answer])[0]
    assert row["rule_acc"] == 0.0
    judge = RecordingJudge()
    judge_rows([row], {rec.id: rec}, judge)
    assert row["judge"] == "incorrect" and len(judge.items) == 1
    return judge.items[0]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------- MathVista


def test_mathvista_judge_sees_the_query_and_headline_is_accuracy(tmp_path):
    rows = [{**r, "decoded_image": img()} for r in MV_ROWS]
    recs = load_benchmark("mathvista", write_parquet(tmp_path / "testmini-00000-of-00001.parquet", rows))
    q, ref, ans = asked(recs[1], "102")
    assert (q, ref, ans) == (MV_ROWS[1]["query"], "(A) 97", "102")
    assert "Reference answer: (A) 97\n" in build_messages(q, ref, ans)[1]["content"]
    assert recs[2].extra["meta"]["skills"] == ["geometry reasoning", "algebraic reasoning"]
    s = summarize_benchmark("mathvista", answered(recs, ["1000", "B", "7.5", "1.4"]))
    assert s["accuracy"] == s["record_accuracy"] == 2 / 4                     # correct / records
    assert s["by_meta"]["question_type"] == {"free_form": {"n": 3, "accuracy": 2 / 3},
                                             "multi_choice": {"n": 1, "accuracy": 0.0}}
    assert s["by_meta"]["skills"]["algebraic reasoning"] == {"n": 4, "accuracy": 2 / 4}  # a list counts per item


# --------------------------------------------------------------------------- MathVerse

MV_MC_WO = "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D."
MV_FF_WO = "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300."


def test_mathverse_prompt_is_query_wo_for_every_version(tmp_path):
    recs = load_benchmark("mathverse", FIX / "mathverse")
    rows = json.loads((FIX / "mathverse" / "testmini.json").read_text())
    assert [r.task for r in recs] == ["mathverse/" + v for v in (
        "Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Dominant",
        "Vision Only")]
    td_mc, vo_mc, td_ff, vo_ff = recs[0], recs[4], recs[5], recs[6]
    assert user(td_mc) == (
        "<image>\nPlease directly answer the question and provide the correct option letter, e.g., A, B, C, D.\n"
        "Question: As shown in the figure, in triangle ABC, it is known that angle A = 80.0, angle B = 60.0, point D "
        "is on AB and point E is on AC, DE parallel BC, then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\n"
        "C:120°\nD:140°")
    assert user(vo_mc) == ("<image>\nAccording to the question shown in the image, please directly answer the "
                           "question and provide the correct option letter, e.g., A, B, C, D.")
    assert user(td_ff) == ("<image>\nPlease directly answer the question and provide the final value, e.g., 1, 2.5, "
                           "300.\nQuestion: Each side of the square in the figure is 6 cm long. Find the perimeter "
                           "of the square.")
    assert user(vo_ff) == ("<image>\nAccording to the question shown in the image, please directly answer the "
                           "question and provide the final value, e.g., 1, 2.5, 300.")
    assert [user(r) for r in recs] == ["<image>\n" + row["query_wo"] for row in rows]
    # a file without query_wo (older exports) gets the same words
    (tmp_path / "images").symlink_to(FIX / "mathverse" / "images")
    bare = [{k: v for k, v in row.items() if k not in ("query_wo", "query_cot")} for row in rows]
    (tmp_path / "testmini.json").write_text(json.dumps(bare))
    assert [user(r) for r in load_benchmark("mathverse", tmp_path)] == [user(r) for r in recs]
    # the Vision Only letter question's options come from question_for_eval
    assert vo_mc.ground_truth == "D" and vo_mc.extra["accepted"] == ["(D) 140°"]
    assert td_ff.ground_truth == "24 cm"
    assert vo_mc.extra["meta"] == {"problem_version": "Vision Only", "problem_index": "1",
                                   "question_type": "multi-choice", "subject": "Plane Geometry",
                                   "subfield": "Angle", "source": "GeoQA"}


def test_mathverse_judge_gets_question_for_eval():
    recs = load_benchmark("mathverse", FIX / "mathverse")
    full = json.loads((FIX / "mathverse" / "testmini.json").read_text())[0]["question_for_eval"]
    # a Vision Only row: its question is in the diagram, the judge reads question_for_eval
    q, ref, ans = asked(recs[4], "B")
    assert (q, ref, ans) == (full, "(D) 140°", "B")
    content = build_messages(q, ref, ans)[1]["content"]
    assert content.startswith("Question:\n" + full + "\n\nReference answer: (D) 140°\nStudent's final answer: B\n")
    q, ref, _ = asked(recs[6], "36")
    assert q.startswith("Each side of the square") and ref == "24 cm"


def test_mathverse_overall_is_over_the_five_diagram_versions():
    recs = load_benchmark("mathverse", FIX / "mathverse")
    # hand labels: TD right, TL wrong, VI right, VD wrong, VO right | free-form TD right, VO wrong
    rows = answered(recs, ["D", "B", "(D) 140°", "A", "D", "24 cm", "36"])
    assert [r["acc"] for r in rows] == [1, 0, 1, 0, 1, 1, 0]
    text_only = dict(rows[0], id="t1", task="mathverse/Text Only", meta={"problem_version": "Text Only"})
    s = summarize_benchmark("mathverse", rows + [text_only])
    assert s["accuracy"] == 4 / 7                          # right / samples, Text Only left out
    assert s["record_accuracy"] == 5 / 8
    per = s["mathverse"]["per_version"]
    assert {v: x["accuracy"] for v, x in per.items()} == {
        "Text Dominant": 2 / 2, "Text Lite": 0 / 1, "Text Only": 1 / 1, "Vision Dominant": 0 / 1,
        "Vision Intensive": 1 / 1, "Vision Only": 1 / 2}
    assert s["notes"] == ["MathVerse: 1 Text Only records reported per version, not in the overall score"]
    assert s["by_meta"]["subfield"] == {"Angle": {"n": 5, "accuracy": 3 / 5}, "Length": {"n": 2, "accuracy": 1 / 2}}


def test_mathverse_folder_with_parquet_and_json_reads_one(tmp_path, caplog):
    """The MathVerse repository ships testmini.parquet (images inside) and testmini.json."""
    rows = json.loads((FIX / "mathverse" / "testmini.json").read_text())
    root = tmp_path / "MathVerse"
    shutil.copytree(FIX / "mathverse", root)
    write_parquet(root / "testmini.parquet", [dict(r, image=img("blue")) for r in rows])
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="prism_rl.eval.loaders"):
        recs = load_benchmark("mathverse", root, notes=notes)
    assert len(recs) == 7 and recs[0].images[0].data == png_bytes("blue")        # from the parquet
    assert notes == [f"mathverse: reading {root / 'testmini.parquet'} (parquet carries its images); not reading "
                     f"{root / 'testmini.json'}: the same split in another form"]
    assert notes[0] in caplog.text


def test_a_run_keeps_the_folder_note_and_the_metadata(tmp_path, monkeypatch):
    """evaluate_benchmark on that folder: the note and the breakdown reach summary.json (the
    samples are already there, so no model is loaded)."""
    from prism_rl.eval import run_benchmark as R

    rows = json.loads((FIX / "mathverse" / "testmini.json").read_text())
    root = tmp_path / "MathVerse"
    shutil.copytree(FIX / "mathverse", root)
    write_parquet(root / "testmini.parquet", [dict(r, image=img("blue")) for r in rows])
    part = tmp_path / "runs" / "r" / "mathverse"
    part.mkdir(parents=True)
    samples = answered(load_benchmark("mathverse", root), ["D", "B", "(D) 140°", "A", "D", "24 cm", "36"])
    (part / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    monkeypatch.setattr(R, "_load_model", lambda *a: pytest.fail("nothing to generate"))
    s = R.evaluate_benchmark("mathverse", root, "some/model", tmp_path / "runs" / "r")
    assert s["notes"][0].startswith(f"mathverse: reading {root / 'testmini.parquet'}")
    assert s["accuracy"] == 4 / 7 and s["by_meta"]["problem_version"]["Vision Only"] == {"n": 2, "accuracy": 0.5}
    saved = [json.loads(x) for x in (part / "samples.jsonl").read_text().splitlines()]
    assert saved[4]["meta"]["problem_version"] == "Vision Only" and saved[4]["meta"]["subfield"] == "Angle"


def test_mathverse_json_reads_images_from_the_zip(tmp_path):
    """testmini.json next to images.zip, not unpacked: the images are read from the zip."""
    root = tmp_path / "MathVerse"
    root.mkdir()
    shutil.copy(FIX / "mathverse" / "testmini.json", root)
    with zipfile.ZipFile(root / "images.zip", "w") as z:
        for f in sorted((FIX / "mathverse" / "images").iterdir()):
            z.write(f, f"images/{f.name}")
    recs = load_benchmark("mathverse", root)
    assert [r.images[0].data for r in recs] == [
        (FIX / "mathverse" / "images" / f"{i}.png").read_bytes() for i in range(1, 8)]


# --------------------------------------------------------------------------- MathVision

MATHV = ('Please solve the problem step by step and put your answer in one "\\boxed{}". If it is a multiple '
         'choice question, only one letter is allowed in the "\\boxed{}".')


def test_mathvision_prompts_level_and_judge():
    free, letters, texts = load_benchmark("mathvision", FIX / "mathvision")
    assert user(free) == f"<image>\n{MATHV}\nHow many different digits can you find in this picture?\n<image1>"
    assert user(letters) == f"<image>\n{MATHV}\nIn which picture can we see the kittens of Misty?\n<image1>"
    assert user(texts) == (f"<image>\n{MATHV}\nWhich colour is the cube with the question mark?\n<image1>\n"
                           "(A) red\n(B) blue\n(C) green\n(D) Yellow\n(E) This cannot be worked out for certain.")
    assert [r.extra["meta"] for r in (free, letters, texts)] == [
        {"subject": "counting", "level": 1}, {"subject": "logic", "level": 3}, {"subject": "logic", "level": 3}]
    assert score_response(free, make_response("- x", "so", "\\boxed{6}"))["acc"] == 1.0  # boxed, as asked
    assert asked(texts, "blue") == ("Which colour is the cube with the question mark?\n<image1>\n(A) red\n(B) blue\n"
                                    "(C) green\n(D) Yellow\n(E) This cannot be worked out for certain.", "(A) red",
                                    "blue")
    rows = answered([free, letters, texts], ["6", "C", "red"])
    assert [r["meta"]["level"] for r in rows] == [1, 3, 3]                 # metadata in the sample rows
    s = summarize_benchmark("mathvision", rows)
    assert s["accuracy"] == 2 / 3
    assert s["by_meta"] == {"subject": {"counting": {"n": 1, "accuracy": 1.0}, "logic": {"n": 2, "accuracy": 0.5}},
                            "level": {"1": {"n": 1, "accuracy": 1.0}, "3": {"n": 2, "accuracy": 0.5}}}


# --------------------------------------------------------------------------- WeMath

WEMATH = ("Now, we require you to solve a multiple-choice math question. Please briefly describe your thought "
          "process and provide the final answer(option).")


def test_wemath_prompt_concept_and_judge():
    recs = load_benchmark("wemath", FIX / "wemath")
    assert user(recs[0]) == (f"<image>\n{WEMATH}\nQuestion: As shown in the diagram, the radius of the circle is ( ) "
                             "cm.\nOption: A. 1 cm;B. 1.5 cm;C. 3.14 cm;D. 6.28 cm; E. No correct answer")
    assert recs[3].extra["meta"] == {"ID": "3steps_1", "key": "3steps_1", "knowledge concept": "Area of Rectangles"}
    assert asked(recs[6], "18 cm²") == (
        "Question: The shaded part is half of the rectangle. What is its area?\n"
        "Option: A. 6 cm²;B. 9 cm²;C. 12 cm²;D. 18 cm²;E. No correct answer", "(B) 9 cm²", "18 cm²")


def test_wemath_headline_is_the_strict_score():
    """The fixture: a 2-step problem answered right throughout (complete mastery) and a 3-step
    one whose steps are right but whose multi-step question is wrong (inadequate
    generalisation): 6 of 7 sub-problems right (85.7%), strict score (2 - 0.5*1 - 0 - 0)/2 = 75%."""
    recs = load_benchmark("wemath", FIX / "wemath")
    rows = answered(recs, ["A", "B", "C", "C", "B", "B", "D"])
    assert [r["acc"] for r in rows] == [1, 1, 1, 1, 1, 1, 0]
    s = summarize_benchmark("wemath", rows)
    assert s["record_accuracy"] == pytest.approx(6 / 7)
    assert s["accuracy"] == s["rule_accuracy"] == (2 - 0.5 * 1 - 0 - 0) / 2 == 0.75
    w = s["wemath"]
    assert (w["problems"], w["IK"], w["IG"], w["CM_strict"], w["RM_strict"]) == (2, 0, 1, 1, 0)
    assert (w["S1"], w["S2"], w["S3"]) == (5 / 5, 1.0, 0.0)
    assert s["by_meta"]["knowledge concept"] == {"Area of Rectangles": {"n": 4, "accuracy": 3 / 4},
                                                 "Circumference of Circles": {"n": 3, "accuracy": 1.0}}
    assert summary_line({**s, "generated_now": 0}).startswith(
        "WeMath strict score of the four-dimensional metric: 75.0% (rules 75.0%); loose 75.0; strict IK 0, IG 1, "
        "CM 1, RM 0 of 2 problems; sub-problem accuracy 85.7; format 100.0%")


def test_wemath_strict_and_loose_differ_as_published():
    """Four 2-step problems, hand-labelled (step 1, step 2, multi-step):
    P1 (T, F, T): RM strict, CM loose; P2 (F, F, T): RM strict and loose; P3 (F, T, F): IK;
    P4 (T, T, T): CM. N = 4, IK = 1, IG = 0, RM_strict = 2, RM_loose = 1:
    strict = (4 - 0 - 2 - 1)/4 = 0.25, loose = (4 - 0 - 1 - 1)/4 = 0.5."""
    labels = {"P1": (1, 0, 1), "P2": (0, 0, 1), "P3": (0, 1, 0), "P4": (1, 1, 1)}
    rows = [{"id": f"{p}/{k}", "task": f"wemath/{k}", "acc": float(v), "rule_acc": float(v), "format": 1.0,
             "tokens": 1, "finish": "stop", "meta": {"ID": p, "key": k}}
            for p, vals in labels.items() for k, v in zip(("2steps_1", "2steps_2", "2steps_multi"), vals)]
    rows.append({**rows[0], "id": "P5/2steps_1", "meta": {"ID": "P5", "key": "2steps_1"}})  # incomplete
    s = summarize_benchmark("wemath", rows)
    w = s["wemath"]
    assert (w["IK"], w["IG"], w["CM_strict"], w["CM_loose"], w["RM_strict"], w["RM_loose"]) == (1, 0, 1, 2, 2, 1)
    assert s["accuracy"] == w["score_strict"] == 0.25 and w["score_loose"] == 0.5
    assert w["RM_strict_rate"] == 2 / (2 + 1) and w["RM_loose_rate"] == 1 / (1 + 2)
    assert w["incomplete_problems"] == 1 and "1 problems lack a sub-problem" in s["notes"][0]


def test_wemath_zip_and_unpacked_copy(tmp_path):
    """The release: testmini.json and its images in a zip; read from the zip. Unpacked next to
    it with a second copy of testmini.json: the shallowest copy is read, once."""
    root = tmp_path / "We-Math"
    root.mkdir()
    shutil.copy(FIX / "wemath" / "testmini.json", root)
    with zipfile.ZipFile(root / "testmini.zip", "w") as z:
        for f in sorted((FIX / "wemath").rglob("*.png")):
            z.write(f, "testmini/" + str(f.relative_to(FIX / "wemath")))
    zipped = load_benchmark("wemath", root)
    assert len(zipped) == 7 and zipped[0].images[0].data == (FIX / "wemath" / "2steps/image/1-1.png").read_bytes()
    unpacked = root / "testmini"
    for d in ("2steps", "3steps"):
        shutil.copytree(FIX / "wemath" / d, unpacked / d)
    shutil.copy(FIX / "wemath" / "testmini.json", unpacked)
    notes: list[str] = []
    recs = load_benchmark("wemath", root, notes=notes)
    assert [r.id for r in recs] == [r.id for r in zipped]
    assert notes == [f"wemath: reading {root / 'testmini.json'} (the shallowest copy); not reading "
                     f"{unpacked / 'testmini.json'}: the same split in another form"]
    # no zip and no images: the message says where the image must be
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(FIX / "wemath" / "testmini.json", bare)
    with pytest.raises(DataError, match=r"record 0, field 'image_path': image file not found: 2steps/image/1-1.png.*"
                                        r"unpack the release's image archive so that it is .*bare/2steps/image/1-1.png"):
        load_benchmark("wemath", bare)


# --------------------------------------------------------------------------- MMMU


def _mmmu_rows() -> list[dict]:
    base = {"explanation": "", "image_2": None, "image_3": None, "image_4": None, "image_5": None, "image_6": None,
            "image_7": None, "img_type": "['Diagrams']", "topic_difficulty": "Medium"}
    return [
        dict(base, id="validation_Physics_1", question="<image 1> What is the net force on the block?",
             options="['2 N', '4 N', '6 N']", image_1=img("red"), answer="B", question_type="multiple-choice",
             subfield="Classical Mechanics"),
        dict(base, id="validation_Math_2", question="Find x in <image 1>.", options="[]", image_1=img("blue"),
             answer="['3', '3.0']", question_type="open", subfield="Algebra", topic_difficulty="Hard"),
        dict(base, id="validation_History_3", question="Which empire built <image 1>?",
             options="['Roman', 'Ottoman']", image_1=img("green"), answer="A", question_type="multiple-choice",
             subfield="World History"),
    ]


def test_mmmu_prompts_judge_and_accuracy(tmp_path):
    write_parquet(tmp_path / "MMMU" / "Physics" / "validation-00000-of-00001.parquet", _mmmu_rows()[:1])
    write_parquet(tmp_path / "MMMU" / "Math" / "validation-00000-of-00001.parquet", _mmmu_rows()[1:2])
    write_parquet(tmp_path / "MMMU" / "History" / "validation-00000-of-00001.parquet", _mmmu_rows()[2:])
    hist, math, phys = load_benchmark("mmmu", tmp_path / "MMMU")  # folders in name order
    assert user(phys) == ("<image> What is the net force on the block?\n(A) 2 N\n(B) 4 N\n(C) 6 N\n\n"
                          "Answer with the option's letter from the given choices directly.")
    assert user(math) == "Find x in <image>.\nAnswer the question using a single word or phrase."
    assert phys.extra["meta"] == {"subject": "Physics", "domain": "Science", "subfield": "Classical Mechanics",
                                  "topic_difficulty": "Medium", "question_type": "multiple-choice"}
    assert asked(phys, "6 N") == ("[image] What is the net force on the block?\n(A) 2 N\n(B) 4 N\n(C) 6 N",
                                  "(B) 4 N", "6 N")
    s = summarize_benchmark("mmmu", answered([hist, math, phys], ["B", "3", "B"]))
    assert s["accuracy"] == 2 / 3                                # correct / questions (instance level)
    assert s["by_meta"]["domain"] == {"Humanities and Social Science": {"n": 1, "accuracy": 0.0},
                                      "Science": {"n": 2, "accuracy": 1.0}}


# --------------------------------------------------------------------------- MMMU-Pro


def _mmmu_pro(tmp_path: Path, vision: bool = True) -> Path:
    opts = [f"option {i}" for i in range(10)]
    std = {"id": "test_History_1", "question": "Who made <image 1>?", "options": str(opts), "explanation": "",
           "image_1": img(), "image_2": None, "image_3": None, "image_4": None, "image_5": None, "image_6": None,
           "image_7": None, "img_type": "['Paintings']", "answer": "J", "topic_difficulty": "Medium",
           "subject": "History"}
    root = tmp_path / "MMMU_Pro"
    write_parquet(root / "standard (10 options)" / "test-00000-of-00001.parquet",
                  [std, dict(std, id="test_Math_2", question="Evaluate <image 1>.", answer="A", subject="Math")])
    if vision:
        write_parquet(root / "vision" / "test-00000-of-00001.parquet", [
            {"id": "test_History_1", "image": img("blue"), "options": str(opts), "answer": "C", "subject": "History"}])
    return root


def test_mmmu_pro_prompts_and_judge(tmp_path):
    s1, s2, v = load_benchmark("mmmu_pro", _mmmu_pro(tmp_path))
    assert user(s1) == ("Who made <image>?\nA. option 0\nB. option 1\nC. option 2\nD. option 3\nE. option 4\n"
                        "F. option 5\nG. option 6\nH. option 7\nI. option 8\nJ. option 9\n"
                        "Answer the preceding multiple choice question. Think step by step before answering.")
    assert user(v) == ("<image>\nWrite out the multiple-choice question in the image and then solve it. "
                       "Think step by step before answering.")
    assert v.extra["meta"] == {"setting": "vision", "subject": "History", "domain": "Humanities and Social Science"}
    q, ref, ans = asked(v, "option 3")
    assert q.startswith("(The question is shown in an image.)\n(A) option 0\n") and q.endswith("(J) option 9")
    assert (ref, ans) == ("(C) option 2", "option 3")


def test_mmmu_pro_score_is_the_mean_of_both_settings_and_only_then(tmp_path):
    recs = load_benchmark("mmmu_pro", _mmmu_pro(tmp_path))
    rows = answered(recs, ["J", "B", "C"])             # standard 1 of 2, vision 1 of 1
    s = summarize_benchmark("mmmu_pro", rows)
    assert s["accuracy"] == (1 / 2 + 1 / 1) / 2 == 0.75 and s["rule_accuracy"] == 0.75
    assert s["record_accuracy"] == 2 / 3               # pooled: not the MMMU-Pro score
    one = load_benchmark("mmmu_pro", _mmmu_pro(tmp_path / "std", vision=False))
    s = summarize_benchmark("mmmu_pro", answered(one, ["J", "B"]))
    assert s["accuracy"] is None and s["mmmu_pro"]["standard"] == 0.5 and s["mmmu_pro"]["vision"] is None
    assert s["notes"] == ["MMMU-Pro: only the standard setting was evaluated (50.0%); the vision setting is missing, "
                          "so there is no MMMU-Pro score (the mean of both settings)"]
    assert summary_line({**s, "generated_now": 0}).startswith(
        "MMMU-Pro: no mean of the standard (10 options) and vision accuracies (MMMU-Pro: only the standard setting")
    (tmp_path / "runs" / "r1" / "mmmu_pro").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "mmmu_pro" / "summary.json").write_text(json.dumps(s))
    md = write_report(tmp_path / "runs")["md"].read_text()
    assert "| r1 | - | - | - | - | - | - | - | - |" in md          # no MMMU-Pro number, no average
    assert "- MMMU-Pro: mean of the standard (10 options) and vision accuracies" in md
    assert "- r1: MMMU-Pro: only the standard setting was evaluated (50.0%)" in md
    assert "- r1, MMMU-Pro: standard 50.0 (n 2), vision - (n 0)" in md


# --------------------------------------------------------------------------- HallusionBench


def _hb_rows() -> list[dict]:
    """A VD set asked on its original (figure 0) and edited (figure 1) images, two questions
    each, and a VS chart with two questions (fields of the HallusionBench card)."""
    spec = [("VD", "illusion", "0", "0", "0", "1"), ("VD", "illusion", "0", "0", "1", "0"),
            ("VD", "illusion", "0", "1", "0", "0"), ("VD", "illusion", "0", "1", "1", "1"),
            ("VS", "chart", "1", "1", "0", "1"), ("VS", "chart", "1", "1", "1", "0")]
    return [{"category": c, "subcategory": sc, "visual_input": "1" if f == "0" else "2", "set_id": s,
             "figure_id": f, "sample_note": "", "question_id": q, "question": f"Question {q} about {c} {s}?",
             "gt_answer_details": f"Details {c}{s}{f}{q}.", "gt_answer": a,
             "filename": f"./hallusion_bench/{c}/{sc}/{s}_{f}.png", "image": img()}
            for c, sc, s, f, q, a in spec]


def test_hallusionbench_prompt_judge_and_three_accuracies(tmp_path):
    recs = load_benchmark("hallusionbench", write_parquet(tmp_path / "image-00000-of-00001.parquet", _hb_rows()))
    assert [user(r) for r in recs][:2] == ["<image>\nQuestion 0 about VD 0?", "<image>\nQuestion 1 about VD 0?"]
    assert asked(recs[0], "No, it is not.") == ("Question 0 about VD 0?", "Yes. Details VD000.", "No, it is not.")
    # hand labels: fig0 q0 right, fig0 q1 right, fig1 q0 wrong, fig1 q1 right, VS q0 right, VS q1 right
    rows = answered(recs, ["Yes, they are the same size.", "No", "Yes", "yes", "Yes.", "No, it does not."])
    assert [r["acc"] for r in rows] == [1, 1, 0, 1, 1, 1]
    s = summarize_benchmark("hallusionbench", rows)
    h = s["hallusionbench"]
    assert s["accuracy"] == h["aAcc"] == 5 / 6
    # qAcc: (VD,0,q0) [right, wrong], (VD,0,q1) [right, right], (VS,1,q0) [right], (VS,1,q1) [right] -> 3/4
    assert h["qAcc"] == 3 / 4
    # fAcc: (VD,0,f0) [right, right], (VD,0,f1) [wrong, right], (VS,1,f1) [right, right] -> 2/3
    assert h["fAcc"] == 2 / 3
    assert s["by_meta"]["category"] == {"VD": {"n": 4, "accuracy": 3 / 4}, "VS": {"n": 2, "accuracy": 1.0}}
    assert summary_line({**s, "generated_now": 0}).startswith(
        "Hallu aAcc: accuracy over the image questions (qAcc and fAcc beside it): 83.3% (rules 83.3%); "
        "qAcc 75.0, fAcc 66.7;")


# --------------------------------------------------------------------------- the results table


def test_results_table_says_what_each_number_is(tmp_path):
    recs = load_benchmark("wemath", FIX / "wemath")
    s = summarize_benchmark("wemath", answered(recs, ["A", "B", "C", "C", "B", "B", "D"]))
    (tmp_path / "run" / "wemath").mkdir(parents=True)
    (tmp_path / "run" / "wemath" / "summary.json").write_text(json.dumps(s))
    md = results_markdown(collect_results(tmp_path))
    assert "| run | - | - | - | 75.0 | - | - | - | 75.0* |" in md       # the strict score, not 85.7
    for line in ("- MVista: accuracy over testmini",
                 "- MVerse: accuracy over the five versions with a diagram (Text Only is reported apart)",
                 "- WeMath: strict score of the four-dimensional metric",
                 "- Hallu: aAcc: accuracy over the image questions (qAcc and fAcc beside it)",
                 "- run, WeMath: loose 75.0; strict IK 0, IG 1, CM 1, RM 0 of 2 problems; sub-problem accuracy 85.7"):
        assert line in md, line
