"""Hostile and unlucky inputs (issue 15): images that would eat memory or that the processor
refuses, image paths that climb out of the data folder, RL records without a ground truth,
broken ``prism reward`` input, math-verify workers that could be hijacked or orphaned, and a
``prism serve`` that a client could make read files or hold up.

Every case runs the real code: real PNG files (a real zlib decompression bomb among them), a
real RLVR run of the tiny model, real worker processes killed with SIGKILL, and a real server
process driven over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

import prism_rl
from prism_rl.cli import build_parser, main
from prism_rl.config import ConfigError, SFTConfig, load_config
from prism_rl.data.images import (
    DEFAULT_LIMITS,
    ImageLimits,
    configure_images,
    image_limits,
    set_image_dirs,
    set_image_limits,
)
from prism_rl.data.layouts import read_records, write_records
from prism_rl.data.processing import encode_all, encode_prompt
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.data.stream import prompt_pool
from prism_rl.format import SYSTEM_PROMPT
from prism_rl.jobs import serve
from prism_rl.models.loading import load_processor

from conftest import CONFIGS, png_bytes, shadowed_math_verify_env
from server_process import start_server_process, stop_server_process, wait_until_ready

SRC = str(Path(prism_rl.__file__).resolve().parents[1])


# --------------------------------------------------------------------------- hostile images

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid grey PNG whose all-zero rows compress ~1000:1: a few hundred KB on disk,
    ``width * height`` bytes once decoded (the classic decompression bomb)."""
    raw = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width x height`` (its pixel data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def plain_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile_images():
    """name -> (PNG bytes, words its error must contain)."""
    return {
        "bomb": (bomb_png(12000, 12000), "144,000,000 pixels, over the limit of 67,108,864 (data.max_image_pixels"),
        "huge": (header_only_png(20000, 20000), "over the limit of 67,108,864 (data.max_image_pixels)"),
        "strip": (plain_png(8000, 20), "aspect ratio 400:1 is over the limit of 200:1 (data.max_image_aspect_ratio)"),
    }


@pytest.fixture(autouse=True)
def default_image_settings():
    set_image_limits(DEFAULT_LIMITS)
    set_image_dirs([])
    yield
    set_image_limits(DEFAULT_LIMITS)
    set_image_dirs([])


def _record(data: bytes, index: int = 0, source: str = "hostile.parquet") -> Record:
    return Record(id=f"r{index}", messages=[{"role": "user", "content": "<image>How many circles?"}],
                  images=[ImageRef(data=data)], ground_truth="1", source=source, index=index)


@pytest.mark.parametrize("name", ["bomb", "huge", "strip"])
def test_hostile_images_are_named_data_errors_before_decoding(hostile_images, name):
    data, words = hostile_images[name]
    rec = _record(data, 4)
    with pytest.raises(DataError) as err:
        rec.check_images()  # the header alone is enough to refuse it
    assert str(err.value).startswith("hostile.parquet, record 4, field 'images': cannot load image bytes #0: ")
    assert words in str(err.value)
    t = time.perf_counter()
    with pytest.raises(DataError, match="record 4, field 'images'"):
        rec.load_images()
    assert time.perf_counter() - t < 0.5  # nothing was decoded (the bomb decodes to 144 MB)


def test_a_processor_refusal_is_a_data_error_too(tiny_model_dir):
    """Should an image pass the decoder's limits (set past Qwen's 200:1 here, which the config
    does not allow), the processor's own ValueError is a DataError naming the record."""
    processor = load_processor(tiny_model_dir)
    set_image_limits(ImageLimits(max_aspect_ratio=1000))
    with pytest.raises(DataError, match=r"x\.json, record 2, field 'images': the processor refused the images: "
                                        r"absolute aspect ratio must be smaller than 200"):
        encode_prompt(processor, _record(plain_png(4020, 20), 2, "x.json"))
    assert encode_prompt(processor, _record(plain_png(4000, 20))).prompt_len > 0  # exactly 200:1 is fine


def test_image_limits_are_settings(tiny_model_dir):
    cfg = load_config(SFTConfig, None, ["data.max_image_pixels=5000", "data.max_image_aspect_ratio=3",
                                        "data.min_image_side=40"])
    limits = image_limits(cfg.data)
    assert (limits.max_pixels, limits.max_aspect_ratio, limits.min_side) == (5000, 3, 40)
    set_image_limits(limits)
    cases = {(96, 96): "9,216 pixels, over the limit of 5,000 (data.max_image_pixels",
             (32, 32): "the shorter side is under the limit of 40 pixels (data.min_image_side)",
             (125, 40): "aspect ratio 3.12:1 is over the limit of 3:1 (data.max_image_aspect_ratio)"}
    for (w, h), words in cases.items():
        with pytest.raises(DataError, match=r"field 'images'") as err:
            _record(plain_png(w, h)).load_images()
        assert words in str(err.value)
    assert _record(plain_png(60, 60)).load_images()[0].size == (60, 60)
    defaults = SFTConfig().data
    assert (defaults.max_image_pixels, defaults.max_image_aspect_ratio, defaults.min_image_side) == (8192**2, 200, 1)
    # Qwen's processor refuses more than 200:1, Pillow more than ~179 megapixels: not settable past them
    for bad in ("data.max_image_aspect_ratio=300", "data.max_image_pixels=200000000", "data.min_image_side=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(SFTConfig, None, [bad])


def test_skip_bad_skips_and_counts_hostile_images(tiny_model_dir, hostile_images):
    processor = load_processor(tiny_model_dir)
    records = [_record(png_bytes(), 0)] + [_record(hostile_images[k][0], i + 1) for i, k in
                                            enumerate(["bomb", "huge", "strip"])]
    bad = BadRecords()
    encoded = encode_all(processor, records, eos_id=0, max_length=4096, with_response=False, skip_bad=True, bad=bad)
    assert [e.record.index for e in encoded] == [0]
    assert bad.count == 3 and [r.split(": ")[0] for r in bad.reasons] == [
        f"hostile.parquet, record {i}" for i in (1, 2, 3)]
    with pytest.raises(DataError, match="record 1, field 'images'"):
        encode_all(processor, records, eos_id=0, max_length=4096, with_response=False)


def _rl_file(path: Path, hostile: dict) -> Path:
    good = [Record(id=f"g{i}", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": "<image>How many red circles are there?"}],
                   images=[ImageRef(data=png_bytes("red"))], ground_truth="1") for i in range(3)]
    bad = [Record(id=k, messages=good[0].messages, images=[ImageRef(data=hostile[k][0])], ground_truth="1")
           for k in ("bomb", "huge", "strip")]
    no_truth = Record(id="nogt", messages=good[0].messages, images=[ImageRef(data=png_bytes("red"))])
    write_records(good[:1] + bad + [no_truth] + good[1:], path)
    return path


def _rl_args(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["rl", "--config", str(CONFIGS / "quickstart" / "rl.yaml"), f"model.path={tiny}", f"data.train={data}",
            "data.eval=", f"output_dir={out}", "train.steps=3", "rollout.n=2", "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=6", "train.save_every=100", *extra]


def test_rl_skips_hostile_images_and_records_without_truth(tiny_model_dir, hostile_images, tmp_path, capsys):
    """The issue's RL run crashed at step 3 with no checkpoint; with skip_bad it now runs to the
    end, and each bad record (three images, one missing ground truth) is named in summary.json."""
    data = _rl_file(tmp_path / "rl.parquet", hostile_images)
    assert main(_rl_args(tiny_model_dir, data, tmp_path / "run", "data.skip_bad=true")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["bad_records"] == 4
    reasons = "\n".join(summary["bad_record_reasons"])
    for i, k in enumerate(["bomb", "huge", "strip"], start=1):
        assert f"rl.parquet, record {i}" in reasons and hostile_images[k][1] in reasons
    assert "rl.parquet, record 4: no ground truth to score responses against" in reasons
    # without skip_bad: one error line naming the first bad record, before any step
    assert main(_rl_args(tiny_model_dir, data, tmp_path / "run2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("prism rl: error: ") and "rl.parquet, record " in err
    assert not (tmp_path / "run2" / "metrics.jsonl").exists() or '"step"' not in (
        tmp_path / "run2" / "metrics.jsonl").read_text()


def test_rl_needs_a_ground_truth_unless_a_plugin_scores(tiny_model_dir, tmp_path):
    processor = load_processor(tiny_model_dir)
    path = tmp_path / "p.parquet"
    write_records([Record(id=str(i), messages=[{"role": "user", "content": f"{i}+{i}?"}], ground_truth=gt)
                   for i, gt in enumerate(["2", None, "  "])], path)
    kw = dict(max_prompt_length=512, limit=None)
    with pytest.raises(DataError, match=r"p\.parquet, record 1, field 'ground_truth': no ground truth"):
        prompt_pool(str(path), processor, skip_bad=False, bad=BadRecords(), need_ground_truth=True, **kw)
    bad = BadRecords()
    pool = prompt_pool(str(path), processor, skip_bad=True, bad=bad, need_ground_truth=True, **kw)
    assert [r.index for r in pool.records] == [0] and bad.count == 2
    assert len(prompt_pool(str(path), processor, skip_bad=False, bad=BadRecords(), **kw)) == 3  # plug-in rewards


# --------------------------------------------------------------------------- image paths

def test_relative_image_paths_stay_inside_the_data_folder(tmp_path):
    data_dir, outside = tmp_path / "data", tmp_path / "secret"
    (data_dir / "img").mkdir(parents=True)
    outside.mkdir()
    (data_dir / "img" / "a.png").write_bytes(png_bytes())
    (outside / "b.png").write_bytes(png_bytes("blue"))
    (data_dir / "linked").symlink_to(outside)  # a link the user put inside the folder is theirs
    depth = "../" * len(data_dir.parts)
    images = {"ok": "img/a.png", "dotted": "img/../img/a.png", "linked": "linked/b.png",
              "absolute": str(outside / "b.png"), "climb": "../secret/b.png", "passwd": depth + "etc/passwd"}
    rows = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
             "images": [p]} for p in images.values()]
    (data_dir / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as err:
        read_records(data_dir / "d.json")
    assert str(err.value) == (f"{data_dir / 'd.json'}, record 4, field 'images': image 0: image path ../secret/b.png "
                              f"leads outside the data file's folder {data_dir} (a relative image path must stay "
                              "inside it; name a file elsewhere by its absolute path, or allow its folder with "
                              "data.image_dirs)")
    bad = BadRecords()
    recs = read_records(data_dir / "d.json", skip_bad=True, bad=bad)
    assert [r.index for r in recs] == [0, 1, 2, 3] and bad.count == 2
    assert "record 5, field 'images'" in bad.reasons[1] and "etc/passwd leads outside" in bad.reasons[1]
    assert [r.load_images()[0].getpixel((10, 10)) for r in recs] == [(255, 0, 0), (255, 0, 0), (0, 0, 255),
                                                                     (0, 0, 255)]
    # a folder the config allows: the climb into it is fine, /etc still is not
    configure_images(load_config(SFTConfig, None, [f"data.image_dirs=[{outside}]"]).data)
    bad = BadRecords()
    recs = read_records(data_dir / "d.json", skip_bad=True, bad=bad)
    assert [r.index for r in recs] == [0, 1, 2, 3, 4] and bad.count == 1 and "record 5" in bad.reasons[0]
    assert recs[4].load_images()[0].getpixel((10, 10)) == (0, 0, 255)


# --------------------------------------------------------------------------- prism reward input

def _reward(tmp_path, content: bytes, capsys) -> tuple[int, str, Path]:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(content)
    out.write_text("previous output\n")
    rc = main(["reward", "--input", str(src), "--output", str(out)])
    return rc, capsys.readouterr().err.strip(), out


GOOD_LINE = json.dumps({"response": "<caption>c</caption><think>t</think><answer>2</answer>", "ground_truth": "2"})


@pytest.mark.parametrize("content,words", [
    ((GOOD_LINE + "\n" + '{"response": "a\\ud800b", "ground_truth": "1"}\n').encode(),
     "in.jsonl:2: field 'response' holds a lone surrogate escape (such as \\ud800), which is not valid Unicode"),
    ((GOOD_LINE + "\n").encode() + b'{"response": "\xff\xfe", "ground_truth": "1"}\n',
     "in.jsonl:2: not UTF-8 text (byte 14: b'\\xff'); expected JSONL"),
    (b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00\x08\x1c\x01\x00\x00\x00\x00\x00\x00\x00\x80PAR1",
     "in.jsonl:1: not UTF-8 text"),
    (b"", "in.jsonl: no records to score (the file is empty)"),
    (b"\n  \n", "in.jsonl: no records to score (the file is empty)"),
    (b"[" * 100000 + b"\n", "in.jsonl:1: invalid JSON"),
    ((json.dumps({"response": "r", "ground_truth": {"a": 1}}) + "\n").encode(),
     "in.jsonl:1: field 'ground_truth' must be a string or number"),
])
def test_bad_reward_input_is_one_error_line_and_no_output(tmp_path, capsys, content, words):
    rc, err, out = _reward(tmp_path, content, capsys)
    assert rc == 2 and err.startswith("prism reward: error: ") and words in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert out.read_text() == "previous output\n"  # untouched: written only whole, at the end
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left


def test_reward_folder_input_and_output(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(GOOD_LINE + "\n")
    assert main(["reward", "--input", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"prism reward: error: {tmp_path}: is a folder, not a JSONL file"
    (tmp_path / "dir").mkdir()
    assert main(["reward", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "dir")]) == 2
    assert capsys.readouterr().err.strip() == f"prism reward: error: --output {tmp_path / 'dir'}: is a folder"
    assert main(["reward", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["score"] == 1.0


# --------------------------------------------------------------------------- math-verify workers

SHADOWS = {
    # each would leave a marker if a worker (or the CLI) imported it from the working directory
    "json.py": "open('MARKER-json', 'w').close()\nraise SystemExit('shadowed json imported')\n",
    "math.py": "open('MARKER-math', 'w').close()\n",
    "signal.py": "open('MARKER-signal', 'w').close()\n",
}
# the last two need math-verify's symbolic comparison (no rule settles them)
ANSWERS = [("2", "2"), ("\\sqrt{4}", "2"), ("(x-1)(x+1)", "x^2-1"), ("x^2+1", "x^2-1")]


def _reward_lines() -> str:
    return "".join(json.dumps({"response": f"<caption>c</caption><think>t</think><answer>{a}</answer>",
                               "ground_truth": g}) + "\n" for a, g in ANSWERS)


def test_workers_do_not_import_from_the_working_directory(tmp_path):
    """``prism reward`` run where a json.py, math.py and signal.py lie: none is executed (no
    marker) and the scores equal those of a clean folder, including math-verify's verdicts."""
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for d in (clean, dirty):
        d.mkdir()
        (d / "in.jsonl").write_text(_reward_lines())
    for name, code in SHADOWS.items():
        (dirty / name).write_text(code)
    # -P: the way the `prism` console script runs (its folder, not the cwd, is sys.path[0])
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    for d in (clean, dirty):
        subprocess.run([sys.executable, "-P", "-m", "prism_rl.cli", "reward", "--input", "in.jsonl", "--output",
                        "out.jsonl"], cwd=d, env=env, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in dirty.iterdir() if p.name.startswith("MARKER")) == []
    scores = [[json.loads(line)["acc"] for line in open(d / "out.jsonl")] for d in (clean, dirty)]
    assert scores[0] == scores[1] == [1.0, 1.0, 1.0, 0.0]


def test_workers_ignore_an_empty_pythonpath_entry(tmp_path):
    """``PYTHONPATH=":src"`` (a common shell slip) puts the working directory on sys.path; the
    worker drops it before importing anything."""
    (tmp_path / "json.py").write_text(SHADOWS["json.py"])
    code = ("from prism_rl.reward.math_verify_pool import run_math_verify\n"
            "print(run_math_verify('\\\\sqrt{4}', '2', 10.0))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # the parent starts clean; the worker inherits PYTHONPATH with an empty entry
    proc = subprocess.run([sys.executable, "-P", "-c", "import os; os.environ['PYTHONPATH'] = ':' + os.environ['S']; "
                           "exec(os.environ['C'])"], cwd=tmp_path, env={**env, "S": SRC, "C": code},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "true", proc.stderr
    assert not (tmp_path / "MARKER-json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


WORKER_PARENT = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
from prism_rl.reward import math_verify_pool as mvp
with ThreadPoolExecutor(16) as ex:  # more callers than the pool may have workers
    results = list(ex.map(lambda k: mvp.run_math_verify(f"(x-{k})(x+{k})", f"x^2-{k * k}", 20.0), range(16)))
assert results == ["true"] * 16, results
workers = [w.proc.pid for w in mvp._pool.idle]
child = os.fork()
if child == 0:  # a fork holds the workers' pipes open, so their stdin never closes
    time.sleep(120)
    os._exit(0)
print(" ".join(map(str, workers)), child, mvp.MAX_MATH_VERIFY_WORKERS, flush=True)
time.sleep(120)
"""


def test_workers_are_bounded_and_die_with_their_parent(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", WORKER_PARENT], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fork = None
    try:
        line = parent.stdout.readline().split()
        assert line, parent.stderr.read()
        *workers, fork, limit = map(int, line)
        assert 1 <= len(workers) <= limit <= 4
        assert all(_alive(w) for w in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "math-verify workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if fork:
            try:
                os.kill(fork, signal.SIGKILL)
            except ProcessLookupError:
                pass


BROKEN_MATH_VERIFY = """
import time
from prism_rl.reward import math_verify_pool as mvp
results, times = [], []
for k in range(8):
    t = time.perf_counter()
    results.append(mvp.run_math_verify(f"x^{k}", f"x^{k + 1}", 5.0))
    times.append(time.perf_counter() - t)
print(results, mvp._pool.failed_starts, mvp._pool.broken, max(times[4:]))
"""


def test_workers_that_cannot_start_are_not_restarted_forever(tmp_path):
    """A worker that dies while starting (here: math_verify crashes on import) made every call
    start a fresh worker; after three failed starts the pool stops and answers 'error' at once."""
    env = shadowed_math_verify_env(tmp_path, "raise RuntimeError('crashes on import')")
    proc = subprocess.run([sys.executable, "-c", BROKEN_MATH_VERIFY], env=env, capture_output=True, text=True,
                          timeout=300)
    results, failed, broken, late = proc.stdout.rsplit("]", 1)[0] + "]", *proc.stdout.rsplit("]", 1)[1].split()
    assert results == str(["error"] * 8), proc.stdout + proc.stderr
    assert int(failed) == 3 and broken == "True" and float(late) < 0.05


MISSING_MATH_VERIFY = """
from prism_rl.reward import math_verify_pool as mvp
from prism_rl.reward.matching import check_answer
print(check_answer("4", "4"))          # decided before the fallback: math_verify is never asked
for k in range(3):
    try:
        check_answer("\\sqrt{16}", "4")
    except mvp.MathVerifyUnavailable as e:
        print("raised:", e)
print("starts:", mvp._pool.failed_starts)
"""


def test_a_math_verify_that_cannot_be_imported_stops_the_caller_with_the_reason(tmp_path):
    """A broken install (math_verify raises ImportError) is no reason to score answers 0: every
    comparison that needs the fallback raises MathVerifyUnavailable naming the interpreter and
    the import error, one worker is tried, and the rules before the fallback still work. The
    CLI prints it as one line and exits 1. (On the GPU machine math_verify was missing and the
    pool had scored every fallback comparison 0 with one warning.)"""
    env = shadowed_math_verify_env(tmp_path, "raise ImportError('No module named latex2sympy2_extended')")
    proc = subprocess.run([sys.executable, "-c", MISSING_MATH_VERIFY], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[0] == "Verdict(correct=True, reason='match:exact')", proc.stdout + proc.stderr
    raised = [x for x in lines if x.startswith("raised: ")]
    assert len(raised) == 3 and all(sys.executable in x and "No module named latex2sympy2_extended" in x
                                    and "pip install" in x for x in raised)
    assert lines[-1] == "starts: 1"
    data = tmp_path / "in.jsonl"
    response = "<caption>\n- a grid\n</caption>\n<think>\n16 cells\n</think>\n<answer>\n\\sqrt{16}\n</answer>"
    data.write_text(json.dumps({"response": response, "ground_truth": "4"}) + "\n")
    cli = subprocess.run([sys.executable, "-m", "prism_rl.cli", "reward", "--input", str(data)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.startswith("prism reward: error: math-verify cannot be imported by ")


# --------------------------------------------------------------------------- prism serve

API_KEY = "sk-hostile-7f2a"
BODY_LIMIT, PIXEL_LIMIT, QUEUE_LIMIT = 300_000, 200_000, 3


def test_serve_cli_defaults_match_the_server():
    a = build_parser().parse_args(["serve", "--model", "m"])
    assert a.allow_file_urls is None
    assert (a.max_body_bytes, a.max_image_pixels, a.max_queue) == (
        serve.DEFAULT_MAX_BODY_BYTES, serve.DEFAULT_MAX_IMAGE_PIXELS, serve.DEFAULT_MAX_QUEUE)


@pytest.fixture(scope="module")
def hostile_server(tiny_model_dir, tmp_path_factory):
    """One request generated at a time (max batch 1), three in flight at most, small bodies
    and images; file URLs left at their default (off)."""
    log = tmp_path_factory.mktemp("hostile-serve") / "server.log"
    proc = start_server_process(tiny_model_dir, api_key=API_KEY, log_path=log, extra_args=[
        "--max-context", 1024, "--max-tokens-limit", 600, "--max-batch", 1, "--batch-wait-ms", 0, "--threads", 1,
        "--max-body-bytes", BODY_LIMIT, "--max-image-pixels", PIXEL_LIMIT, "--max-queue", QUEUE_LIMIT])
    proc.served_name = serve.default_model_name(tiny_model_dir)
    try:
        wait_until_ready(proc.base_url, timeout=180, proc=proc)
        yield proc
    finally:
        stop_server_process(proc)


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _chat(server, content, timeout: float = 60, **kw) -> httpx.Response:
    body = {"model": server.served_name, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


def _image(data: bytes) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
            {"type": "text", "text": "What is this?"}]


def _stats(server) -> dict:
    return httpx.get(f"{server.base_url}/v1/stats", headers=AUTH).json()


def _still_serving(server) -> None:
    r = _chat(server, "hi")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_file_urls_are_off_by_default_and_every_refusal_reads_the_same(hostile_server, tmp_path):
    png = tmp_path / "real.png"
    png.write_bytes(png_bytes())
    answers = []
    for url in (png.as_uri(), "file:///etc/passwd", "file:///etc/shadow", (tmp_path / "none.png").as_uri(),
                "file://localhost/etc/hostname", "FILE:///etc/passwd"):
        r = _chat(hostile_server, [{"type": "image_url", "image_url": {"url": url}}])
        answers.append((r.status_code, r.json()))
    assert all(a == answers[0] for a in answers), answers
    status, body = answers[0]
    assert status == 400 and body["error"]["code"] == "invalid_image_url"
    assert "this file:// URL cannot be read: the server reads file URLs only when started with --allow-file-urls" \
        in body["error"]["message"]


def test_sampling_settings_at_their_edges(hostile_server):
    """A seed of 2**80 was a 503 (torch refused it inside generation): now a 400 naming it. A
    temperature of 1e-286 (the fuzz found it) made every logit infinite: now it is greedy."""
    r = _chat(hostile_server, "hi", seed=2**80, temperature=1.0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    for seed in (2**64 - 1, -(2**63), 0):
        assert _chat(hostile_server, "hi", seed=seed, temperature=1.0).status_code == 200
    greedy = _chat(hostile_server, "How many circles?", temperature=0, max_tokens=8)
    tiny = _chat(hostile_server, "How many circles?", temperature=1e-286, max_tokens=8)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_lone_surrogates_are_400s(hostile_server):
    """JSON can escape half a surrogate pair; the tokenizer raised TypeError on it (a 503, the
    fuzz found it), and an error message quoting it could not be encoded."""
    url = f"{hostile_server.base_url}/v1/chat/completions"
    headers = {**AUTH, "Content-Type": "application/json"}
    # json.dumps writes the lone surrogate as the escape \ud800
    body = json.dumps({"model": hostile_server.served_name, "messages": [{"role": "user", "content": "a\ud800b"}]})
    assert "\\ud800" in body
    r = httpx.post(url, content=body.encode(), headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    assert "holds a lone surrogate (\\ud800 at character 1)" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}',
                   headers=headers)
    assert r.status_code == 404 and "The model '\\udfff' does not exist" in r.json()["error"]["message"]
    _still_serving(hostile_server)


def test_bodies_over_the_limit_are_refused_unread(hostile_server):
    url = f"{hostile_server.base_url}/v1/chat/completions"
    name = hostile_server.served_name
    big = json.dumps({"model": name, "messages": [{"role": "user", "content": "circle " * 60_000}]}).encode()
    assert len(big) > BODY_LIMIT
    r = httpx.post(url, content=big, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert f"over this server's limit of {BODY_LIMIT:,} bytes (prism serve --max-body-bytes)" in r.json()[
        "error"]["message"]
    # no Content-Length (chunked): counted as it arrives
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(url, content=chunks, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # 50 MB (the issue's: read and tokenised for 107 s): refused at once, by status or by closing
    t = time.perf_counter()
    try:
        r = httpx.post(url, content=b"x" * 50_000_000, headers={**AUTH, "Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 413
    except httpx.TransportError:
        pass
    assert time.perf_counter() - t < 10
    _still_serving(hostile_server)


def test_image_pixels_per_request_are_limited_before_decoding(hostile_server):
    r = _chat(hostile_server, _image(plain_png(500, 500)))
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "image_too_large" and err["param"].endswith("image_url.url")
    assert f"500 x 500 = 250,000 pixels, over the limit of {PIXEL_LIMIT:,} (prism serve --max-image-pixels" \
        in err["message"]
    three = _image(plain_png(300, 300))[:1] * 3 + [{"type": "text", "text": "?"}]
    r = _chat(hostile_server, three)  # each fits, together they do not
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    assert (f"The images of this request hold 270,000 pixels, over this server's limit of {PIXEL_LIMIT:,} per "
            "request") in r.json()["error"]["message"]
    assert _chat(hostile_server, three[1:]).status_code == 200  # two: 180,000
    t = time.perf_counter()
    r = _chat(hostile_server, _image(bomb_png(8000, 4000)))  # 130 KB; 32 MB once decoded
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    assert time.perf_counter() - t < 2
    r = _chat(hostile_server, _image(plain_png(8000, 20)))
    assert r.status_code == 400 and "aspect ratio 400:1 is over the limit of 200:1" in r.json()["error"]["message"]
    _still_serving(hostile_server)


def _slow_body(name: str, **kw) -> dict:
    """A request that keeps the tiny model busy ~1-3 s: 8 samples of up to 300 tokens."""
    return {"model": name, "messages": [{"role": "user", "content": "Describe the circles."}], "n": 8,
            "temperature": 1.0, "max_tokens": 300, "seed": 5, **kw}


def test_a_full_queue_answers_429_at_once(hostile_server):
    name, url = hostile_server.served_name, f"{hostile_server.base_url}/v1/chat/completions"
    before = _stats(hostile_server)["refused_busy"]
    n = 8
    barrier, answers = threading.Barrier(n), [None] * n

    def ask(i):
        barrier.wait()
        t = time.perf_counter()
        r = httpx.post(url, json=_slow_body(name), headers=AUTH, timeout=120)
        answers[i] = (r.status_code, r.json(), r.headers.get("retry-after"), time.perf_counter() - t)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    busy = [a for a in answers if a[0] == 429]
    ok = [a for a in answers if a[0] == 200]
    assert len(busy) + len(ok) == n, answers
    assert len(ok) >= 1 and len(busy) >= n - QUEUE_LIMIT - 2, [(a[0], a[3]) for a in answers]
    for _status, body, retry, took in busy:
        assert body["error"]["code"] == "server_busy" and retry == "1" and "--max-queue" in body["error"]["message"]
        assert took < 5  # refused at once, not after waiting
    assert _stats(hostile_server)["refused_busy"] - before == len(busy)
    _still_serving(hostile_server)


def test_requests_whose_client_left_are_dropped(hostile_server):
    """The issue's: 100 requests abandoned after 3 s were all generated and a new one waited 41 s.
    Here six requests are abandoned after 0.5 s: only one already generating when its client
    left runs on (one per wave at most), the others leave the queue, and a new request is
    answered within about one generation's time. 16 samples of 300 tokens: one of them at least
    runs to the limit, so every such request takes about as long."""
    name, url = hostile_server.served_name, f"{hostile_server.base_url}/v1/chat/completions"
    t = time.perf_counter()
    assert httpx.post(url, json=_slow_body(name, n=16), headers=AUTH, timeout=120).status_code == 200
    one = time.perf_counter() - t
    before = _stats(hostile_server)
    k, answered = 6, []

    def abandon(i):
        try:
            httpx.post(url, json=_slow_body(name, n=16, seed=100 + i), headers=AUTH, timeout=0.5)
            answered.append(i)  # done within 0.5 s (a loaded machine may still be that fast): not abandoned
        except httpx.TimeoutException:
            pass

    # QUEUE_LIMIT at a time, so none is refused with a 429
    for wave in range(0, k, QUEUE_LIMIT):
        threads = [threading.Thread(target=abandon, args=(i,)) for i in range(wave, wave + QUEUE_LIMIT)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        time.sleep(0.5)  # the server notices within its poll interval
    t = time.perf_counter()
    _still_serving(hostile_server)
    waited = time.perf_counter() - t
    after = _stats(hostile_server)
    generated = after["generate_calls"] - before["generate_calls"] - 1  # the last one is _still_serving's
    abandoned = k - len(answered)
    assert abandoned >= 3, answered
    # every abandoned request is dropped; one per wave at most was already generating and ran on
    assert after["dropped"] - before["dropped"] == abandoned, (before, after)
    assert generated - len(answered) <= 2, (before, after, answered)
    assert waited < 1.5 * one + 2, (waited, one)
    assert after["in_flight"] == 0 and after["queued"] == 0


def test_math_verify_workers_ignore_a_terminal_ctrl_c():
    """SIGINT reaches a terminal's whole process group; a worker must survive it so the step in
    progress finishes with its scores (the run loop then saves and stops)."""
    import os
    import signal as sig

    from prism_rl.reward.math_verify_pool import _WorkerPool
    pool = _WorkerPool(1)
    try:
        assert pool.run("\\frac{1}{2}", "0.5", 5.0, 30.0) == "true"
        (worker,) = pool.idle
        os.kill(worker.proc.pid, sig.SIGINT)
        assert pool.run("\\sqrt{4}", "2", 5.0, 30.0) == "true"
        assert pool.idle == [worker] and worker.proc.poll() is None      # the same worker, alive
    finally:
        pool.close()
