"""Round trips and error reporting for the on-disk data layouts (prism_rl.data.layouts)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_rl.data.layouts import (
    PairRecord,
    read_pairs,
    read_records,
    write_jsonl,
    write_pairs,
    write_sharegpt_json,
    write_verl_parquet,
)
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response

RESPONSE = make_response("- red circle, center", "One red circle.", "1")


def png(colour: str = "red", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def record(i: int = 0, n_images: int = 1, response: str | None = RESPONSE, **extra) -> Record:
    colours = ["red", "green", "blue"]
    return Record(
        id=f"r{i}",
        messages=[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": "<image>" * n_images + f"How many? #{i}"}],
        images=[ImageRef(data=png(colours[(i + k) % 3])) for k in range(n_images)],
        response=response,
        ground_truth=str(i),
        task="count",
        extra=dict(extra),
    )


def image_bytes(ref: ImageRef) -> bytes:
    if ref.data is not None:
        return ref.data
    return (Path(ref.base_dir) / ref.path).read_bytes()


def assert_same(got: Record, want: Record, path: Path, index: int) -> None:
    assert got.id == want.id
    assert got.messages == want.messages
    assert got.response == want.response
    assert got.ground_truth == want.ground_truth
    assert got.task == want.task
    assert [image_bytes(r) for r in got.images] == [image_bytes(r) for r in want.images]
    assert got.source == str(path)
    assert got.index == index


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- round trips


def test_verl_parquet_round_trip(tmp_path):
    recs = [record(0, teacher_caption="<caption>\n- c\n</caption>",
                   teacher_cot="<think>\nt\n</think>\n<answer>\n0\n</answer>",
                   teacher_response="full", public_response="pub", split="align"),
            record(1, n_images=2, teacher_caption="c1", split="align")]
    path = tmp_path / "align.parquet"
    write_verl_parquet(recs, path)
    got = read_records(path)
    assert len(got) == 2
    for i, (g, w) in enumerate(zip(got, recs)):
        assert_same(g, w, path, i)
    assert got[0].extra == {"teacher_caption": "<caption>\n- c\n</caption>",
                            "teacher_cot": "<think>\nt\n</think>\n<answer>\n0\n</answer>",
                            "teacher_response": "full", "public_response": "pub",
                            "split": "align"}
    # Keys a record lacked come back absent, not as None.
    assert got[1].extra == {"teacher_caption": "c1", "split": "align"}
    table = pq.read_table(path).to_pylist()
    assert table[1]["data_source"] == "count"
    assert table[1]["reward_model"] == {"style": "rule", "ground_truth": "1"}
    assert table[1]["extra_info"] == {"index": 1, "split": "align", "task": "count",
                                      "question": "How many? #1", "id": "r1"}
    assert table[0]["prompt"][1]["content"] == "<image>How many? #0"


def test_verl_parquet_prompt_only_has_no_response_column(tmp_path):
    path = tmp_path / "test.parquet"
    write_verl_parquet([record(0, response=None)], path)
    assert "response" not in pq.read_table(path).column_names
    assert read_records(path)[0].response is None


def test_verl_parquet_image_paths_relative_to_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png("blue"))
    table = pa.Table.from_pylist([{
        "data_source": "chart",
        "prompt": [{"role": "user", "content": "<image>Tallest?"}],
        "images": [{"bytes": None, "path": "imgs/a.png"}],
        "reward_model": {"style": "rule", "ground_truth": 3},
        "extra_info": {"id": "x7", "task": "chart"},
    }])
    pq.write_table(table, tmp_path / "d.parquet")
    rec = read_records(tmp_path / "d.parquet")[0]
    assert rec.images[0].path == "imgs/a.png"
    assert rec.images[0].load().getpixel((0, 0)) == (0, 0, 255)
    assert (rec.id, rec.task, rec.ground_truth, rec.question) == ("x7", "chart", "3", "Tallest?")


def test_sharegpt_json_round_trip_writes_relative_image_files(tmp_path):
    recs = [record(0, teacher_caption="t", problem_id="p0"), record(1, n_images=2)]
    path = tmp_path / "sft" / "sft.json"
    write_sharegpt_json(recs, path, image_dir="images")
    raw = json.loads(path.read_text())
    assert raw[0]["messages"][-1] == {"role": "assistant", "content": RESPONSE}
    assert raw[0]["images"][0].startswith("images/") and raw[0]["images"][0].endswith(".png")
    assert (path.parent / raw[0]["images"][0]).read_bytes() == png("red")
    assert raw[0]["ground_truth"] == "0" and raw[0]["task"] == "count"
    got = read_records(path)
    for i, (g, w) in enumerate(zip(got, recs)):
        assert_same(g, w, path, i)
        assert all(ref.data is None and not Path(ref.path).is_absolute() for ref in g.images)
    assert got[0].extra == {"teacher_caption": "t", "problem_id": "p0"}
    assert got[0].load_images()[0].getpixel((3, 3)) == (255, 0, 0)


def test_sharegpt_identical_images_are_stored_once(tmp_path):
    write_sharegpt_json([record(0), record(3)], tmp_path / "s.json")  # both red
    assert len(list((tmp_path / "images").iterdir())) == 1


def test_sharegpt_conversations_variant_and_data_urls(tmp_path):
    path = write_json(tmp_path / "c.json", [{
        "conversations": [{"from": "system", "value": "sys"},
                          {"from": "human", "value": "<image>What colour?"},
                          {"from": "gpt", "value": RESPONSE}],
        "images": [data_url(png("green"))],
        "ground_truth": "green", "task": "colour", "id": "c1", "source_set": "public",
    }])
    rec = read_records(path)[0]
    assert rec.messages == [{"role": "system", "content": "sys"},
                            {"role": "user", "content": "<image>What colour?"}]
    assert rec.response == RESPONSE
    assert rec.images[0].data == png("green")
    assert (rec.id, rec.task, rec.ground_truth) == ("c1", "colour", "green")
    assert rec.extra == {"source_set": "public"}


def test_sharegpt_defaults_for_optional_keys(tmp_path):
    path = write_json(tmp_path / "plain.json", [{
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    }])
    rec = read_records(path)[0]
    assert (rec.id, rec.task, rec.ground_truth, rec.images) == ("plain-0", "default", None, [])


def test_jsonl_round_trip_embeds_data_urls(tmp_path):
    recs = [record(0, note="a"), record(1, n_images=2)]
    path = tmp_path / "d.jsonl"
    write_jsonl(recs, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["images"][0] == data_url(png("red"))
    got = read_records(path)
    for i, (g, w) in enumerate(zip(got, recs)):
        assert_same(g, w, path, i)
    assert got[0].extra == {"note": "a"}


def test_jsonl_with_image_dir_and_mixed_shapes(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl([record(0)], path, image_dir="pics")
    rel = json.loads(path.read_text())["images"][0]
    assert rel.startswith("pics/")
    conv = {"conversations": [{"from": "human", "value": "<image>Q"},
                              {"from": "gpt", "value": "A"}], "images": [rel]}
    with path.open("a") as f:
        f.write("\n" + json.dumps(conv) + "\n")
    got = read_records(path)
    assert [g.index for g in got] == [0, 1]
    assert got[1].messages == [{"role": "user", "content": "<image>Q"}]
    assert got[1].response == "A"
    assert image_bytes(got[1].images[0]) == png("red")


@pytest.mark.parametrize("image_dir", [None, "imgs"])
def test_pairs_round_trip(tmp_path, image_dir):
    pairs = [PairRecord(record(i, response=None), f"tc{i}", f"sc{i}", f"tt{i}", f"st{i}")
             for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    write_pairs(pairs, path, image_dir=image_dir)
    got = read_pairs(path)
    assert len(got) == 3
    for i, (g, w) in enumerate(zip(got, pairs)):
        assert_same(g.record, w.record, path, i)
        assert (g.teacher_caption, g.student_caption, g.teacher_cot, g.student_cot) == \
            (f"tc{i}", f"sc{i}", f"tt{i}", f"st{i}")


def test_pairs_from_bare_question_and_relative_image(tmp_path):
    (tmp_path / "a.png").write_bytes(png("blue"))
    line = {"prompt": "How many?", "image": "a.png", "teacher_caption": "T", "student_caption": "S",
            "teacher_cot": "TC", "student_cot": "SC"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n\n")  # a trailing blank line is ignored
    (pair,) = read_pairs(path)
    assert pair.record.messages == [{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": "<image>How many?"}]
    assert pair.record.question == "How many?"
    assert image_bytes(pair.record.images[0]) == png("blue")


# --------------------------------------------------------------------------- bad input


def test_parquet_missing_prompt_names_file_record_and_field(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"data_source": "x", "images": []}]),
                   tmp_path / "noprompt.parquet")
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "noprompt.parquet")
    msg = str(e.value)
    assert "noprompt.parquet" in msg and "record 0" in msg and "'prompt'" in msg
    assert "missing" in msg


def test_parquet_wrong_type_prompt(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "just text"}]), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet, record 0, field 'prompt': expected a list"):
        read_records(tmp_path / "s.parquet")


def test_json_without_assistant_message(tmp_path):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    bad = {"messages": [{"role": "user", "content": "Q"}]}
    path = write_json(tmp_path / "sft.json", [good, bad])
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert "sft.json" in msg and "record 1" in msg and "'messages'" in msg
    assert "assistant" in msg


def test_json_without_user_message(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"sft\.json, record 0, field 'messages': no user message"):
        read_records(path)


def test_json_wrong_content_type(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"record 0, field 'messages': message 0: content is int"):
        read_records(path)


def test_json_missing_image_file_is_a_bad_record(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"messages": [{"role": "user", "content": "<image>Q"},
                      {"role": "assistant", "content": "A"}], "images": ["images/nope.png"]}])
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert "sft.json" in msg and "record 0" in msg and "'images'" in msg
    assert "images/nope.png" in msg and "not found" in msg


def test_placeholder_count_must_match_images(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "images": [data_url(png())]}])
    with pytest.raises(DataError, match=r"field 'images': 1 images but 0 '<image>' placeholders"):
        read_records(path)


def test_bad_base64_data_url(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"messages": [{"role": "user", "content": "<image>Q"},
                      {"role": "assistant", "content": "A"}],
         "images": ["data:image/png;base64,@@@"]}])
    with pytest.raises(DataError, match=r"record 0, field 'images': image 0: bad base64"):
        read_records(path)


def test_corrupt_image_bytes_fail_only_when_loaded(tmp_path):
    rec = record(0)
    rec.images = [ImageRef(data=b"not a png")]
    write_jsonl([rec], tmp_path / "d.jsonl")
    (got,) = read_records(tmp_path / "d.jsonl")  # reading does not decode
    with pytest.raises(DataError, match=r"d\.jsonl, record 0, field 'images'"):
        got.load_images()


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="junk.parquet: cannot read parquet file"):
        read_records(tmp_path / "junk.parquet")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: invalid JSON"):
        read_records(tmp_path / "broken.json")
    write_json(tmp_path / "obj.json", {"messages": []})
    with pytest.raises(DataError, match="obj.json: expected a JSON list"):
        read_records(tmp_path / "obj.json")
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(DataError, match="d.csv: unknown data file type"):
        read_records(tmp_path / "d.csv")


def test_jsonl_bad_line_names_its_record(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl([record(0)], path)
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl, record 1, field 'json': invalid JSON"):
        read_records(path)


def test_pairs_missing_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Q", "image": None, "teacher_caption": "T",
                                "student_caption": "S", "teacher_cot": "TC"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl, record 0, field 'student_cot': missing"):
        read_pairs(path)


def test_skip_bad_counts_skips_and_keeps_original_indices(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    no_answer = {"messages": [{"role": "user", "content": "Q"}]}
    wrong_type = {"messages": "hello"}
    path = write_json(tmp_path / "sft.json", [good, no_answer, good, wrong_type, good])
    bad = BadRecords()
    got = read_records(path, skip_bad=True, bad=bad)
    assert [r.index for r in got] == [0, 2, 4]
    assert bad.count == 2
    assert "sft.json, record 1, field 'messages'" in bad.reasons[0]
    assert "sft.json, record 3, field 'messages'" in bad.reasons[1]
    assert "skipped 2 bad records" in caplog.text


def test_skip_bad_parquet_and_pairs(tmp_path):
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "Q"}]},
        {"prompt": [{"role": "robot", "content": "Q"}]},
    ]), tmp_path / "d.parquet")
    bad = BadRecords()
    assert [r.index for r in read_records(tmp_path / "d.parquet", skip_bad=True, bad=bad)] == [0]
    assert bad.count == 1 and "record 1, field 'prompt'" in bad.reasons[0]

    path = tmp_path / "p.jsonl"
    ok = {"question": "Q", "image": None, "teacher_caption": "T", "student_caption": "S",
          "teacher_cot": "TC", "student_cot": "SC"}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "teacher_cot": 3}) + "\n")
    got = read_pairs(path, skip_bad=True, bad=bad)
    assert len(got) == 1 and bad.count == 2
    assert "p.jsonl, record 1, field 'teacher_cot'" in bad.reasons[1]


def test_sft_writers_need_a_response(tmp_path):
    with pytest.raises(DataError, match=r"record -1, field 'response'"):
        write_sharegpt_json([record(0, response=None)], tmp_path / "s.json")


def test_data_package_imports_no_model_or_rollout_code():
    """data/ sits below models/ and rollout/: jobs that generate live in prism_rl.jobs."""
    import prism_rl

    src = str(Path(prism_rl.__file__).resolve().parents[1])
    mods = sorted(p.stem for p in (Path(src) / "prism_rl" / "data").glob("*.py") if p.stem != "__init__")
    code = (f"import sys\nfor m in {mods!r}: __import__('prism_rl.data.' + m)\n"
            "bad = [m for m in sys.modules if m.startswith(('prism_rl.models', 'prism_rl.rollout'))]\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_image_decoder_callers_choose_base_folders_and_file_urls(tmp_path):
    from prism_rl.data.images import image_ref
    from prism_rl.data.records import BadField

    data = png()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x.png").write_bytes(data)
    deep = tmp_path / "a" / "b"
    assert image_ref("x.png", "f", base_dirs=(deep, tmp_path)).base_dir == str(tmp_path)
    with pytest.raises(BadField, match="image file not found: x.png"):
        image_ref("x.png", "f", base_dirs=(deep,))
    url = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    assert image_ref(url, "f").data == data and image_ref({"bytes": data, "path": "nope"}, "f").data == data
    assert image_ref(None, "f") is None and image_ref(b"", "f") is None and image_ref({}, "f") is None
    with pytest.raises(BadField, match="only base64 data: URLs are supported"):
        image_ref(str(tmp_path / "x.png"), "f")  # no base folders: paths are refused
    with pytest.raises(BadField, match="this file:// URL cannot be read"):
        image_ref((tmp_path / "x.png").as_uri(), "f")
    assert image_ref((tmp_path / "x.png").as_uri(), "f", file_url_dir=tmp_path).data == data
    with pytest.raises(BadField, match="'bytes' is str, not bytes"):
        image_ref({"bytes": "abc"}, "f", base_dirs=(tmp_path,))
