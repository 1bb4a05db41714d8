"""``prism data show``: the detected layout is named, every turn of a multi-turn record is
printed, and a benchmark release, warm-up pairs and the synthetic sets are shown (not errors)."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_rl.cli import main
from prism_rl.data.layouts import detect_layout
from prism_rl.data.records import DataError
from prism_rl.data.show import show
from prism_rl.data.synth import synthesize
from prism_rl.format import make_response

from conftest import ROOT, png_bytes

BENCH = ROOT / "tests" / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("show") / "d"
    synthesize(out, 40, seed=1)
    return out


def mllm_demo(folder):
    """A two-turn record in LLaMA-Factory's ``mllm_demo.json`` layout (images beside it)."""
    (folder / "mllm_demo_data").mkdir(parents=True)
    (folder / "mllm_demo_data" / "1.png").write_bytes(png_bytes())
    demo = [{"messages": [{"role": "user", "content": "<image>Who are they?"},
                          {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
                          {"role": "user", "content": "What are they doing?"},
                          {"role": "assistant", "content": "They are celebrating on the soccer field."}],
             "images": ["mllm_demo_data/1.png"]}]
    path = folder / "mllm_demo.json"
    path.write_text(json.dumps(demo))
    return path


def mathvista_parquet(path):
    """A MathVista testmini-style parquet (the HF release's columns)."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(buf, format="PNG")
    rows = [{"pid": "1", "question": "Find m\\angle B.", "image": "images/1.jpg",
             "decoded_image": {"bytes": buf.getvalue(), "path": None}, "choices": ["145°", "135°"], "unit": None,
             "precision": None, "answer": "135°", "question_type": "multi_choice", "answer_type": "text",
             "metadata": {"task": "geometry problem solving"},
             "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                      "at the end.\nQuestion: Find m\\angle B.\nChoices:\n(A) 145°\n(B) 135°"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_every_turn_of_a_multi_turn_record_is_shown(tmp_path, capsys):
    path = mllm_demo(tmp_path)
    blocks = show(path, None, k=3)
    assert blocks[0] == f"{path}: ShareGPT JSON (messages); 1 record shown"
    lines = blocks[1].splitlines()
    assert lines[1:5] == ["  user: <image>Who are they?",
                          "  assistant: They're Kane and Gretzka from Bayern Munich.",
                          "  user: What are they doing?",
                          "  assistant: They are celebrating on the soccer field."]
    assert "images=1" in lines[0]
    assert capsys.readouterr().out.startswith(blocks[0])


def test_a_benchmark_parquet_is_shown_as_one(tmp_path, capsys):
    path = mathvista_parquet(tmp_path / "testmini-00000-of-00001.parquet")
    assert detect_layout(path).benchmark == "mathvista"
    assert main(["data", "show", str(path), "--out", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert f"{path}: mathvista benchmark release (parquet); 1 record shown" in out
    assert "(A) 145°" in out and "ground truth: B" in out
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    with pytest.raises(DataError, match="prism eval --benchmark mathvista reads it"):
        show(path)  # without a reader (the data layer cannot import the benchmark loaders)


@pytest.mark.parametrize("path,benchmark", [
    (BENCH / "wemath" / "testmini.json", "wemath"),
    (BENCH / "mathvision" / "data" / "testmini.jsonl", "mathvision"),
    (BENCH / "hallusionbench" / "HallusionBench.json", "hallusionbench"),
])
def test_benchmark_fixtures_are_detected(path, benchmark):
    assert detect_layout(path).benchmark == benchmark


def test_synthetic_sets_show_layout_turns_and_teacher(synth_dir, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    blocks = show(synth_dir / "test.parquet", out, k=5)
    assert blocks[0].endswith("verl parquet; 5 records shown") and len(blocks) == 6
    first = blocks[1].splitlines()
    assert first[1] == "  system: (the PRISM system prompt)" and first[2].startswith("  user: <image>")
    assert first[3].startswith("  assistant (teacher_response): <caption>")
    assert "ground truth:" in first[-1] and "[answer matches]" in first[-1]
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert show(synth_dir / "sft.json", None, k=3)[0].endswith("ShareGPT JSON (messages); 3 records shown")


def test_warmup_pairs_show_both_segments(tmp_path):
    pair = {"question": "How many?", "image": "data:image/png;base64," + base64.b64encode(
        png_bytes()).decode(), "teacher_caption": "<caption>\n- t\n</caption>", "student_caption": "<caption>s</caption>",
        "teacher_cot": "<think>\n1\n</think>\n<answer>\n1\n</answer>", "student_cot": "<think>2</think><answer>2</answer>"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n")
    blocks = show(path, None)
    assert blocks[0].endswith("discriminator warm-up pairs (JSONL); 1 record shown")
    assert "  student caption: <caption>s</caption>" in blocks[1] and "  teacher cot: <think>" in blocks[1]


def test_an_unknown_layout_names_its_columns(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"foo": [1], "bar": ["a"]}), path)
    with pytest.raises(DataError, match=r"x\.parquet: not a layout prism reads \(its columns: bar, foo\)"):
        detect_layout(path)


def test_show_cli_writes_the_contact_sheet_for_a_response_record(tmp_path, capsys):
    rec = {"messages": [{"role": "user", "content": "<image>Q?"},
                        {"role": "assistant", "content": make_response("- c", "t", "4")}],
           "images": ["data:image/png;base64," + base64.b64encode(png_bytes()).decode()],
           "ground_truth": "5"}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert main(["data", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ShareGPT JSONL (messages)" in out and "[answer 4 != truth]" in out
    assert (tmp_path / "one_sheet.png").exists()
