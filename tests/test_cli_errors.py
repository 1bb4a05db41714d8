"""Every ``prism`` command, given bad input, ends with ``prism <command>: error: ...`` naming
the file, record and field (or the option or key), exit status 2 and no traceback.

Each case runs the real CLI in a fresh process, as a user would (``prism eval`` has its own
tests in test_benchmarks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prism_rl
from prism_rl.models.discriminator import init_discriminator

from conftest import CONFIGS
from geo3k import write_geo3k

QS = CONFIGS / "quickstart"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Bad inputs: an empty training file, problems without teacher fields, a bad JSONL line..."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.json").write_text("[]")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text(json.dumps({"response": "x", "ground_truth": "1"}) + "\n{not json\n")
    pq.write_table(pa.table({"foo": [1], "bar": ["a"]}), d / "columns.parquet")
    write_geo3k(d / "geo3k.parquet")  # prompts only: no teacher fields, no responses
    return {"dir": d, "tiny": tiny_model_dir}


@pytest.fixture(scope="module")
def disc(files):
    return init_discriminator(files["tiny"], files["dir"] / "disc", experts=2, top_k=1)


def _case(cmd, args, *words, slow=False):
    """A command (as typed), its arguments (``{dir}``/``{tiny}`` filled in) and words the message holds."""
    return pytest.param(cmd, args, words, id=cmd.replace(" ", "-"), marks=[pytest.mark.slow] if slow else [])


CASES = [
    _case("data synth", "data synth --out {dir}/s --families count,maze", "--families: unknown maze"),
    _case("data show", "data show {dir}/columns.parquet", "{dir}/columns.parquet: not a layout prism reads",
          "bar, foo"),
    _case("data convert", "data convert {dir}/geo3k.parquet --out {dir}/x.json",
          "{dir}/geo3k.parquet, record 0, field 'response'"),
    _case("data filter-difficulty", "data filter-difficulty --model {tiny} --data {dir}/geo3k.parquet --out {dir}/f.parquet",
          "{dir}/geo3k.parquet, record 0, field 'prompt': the prompt asks for \\boxed{{}} answers"),
    _case("data curate", "data curate --problems {dir}/none.parquet --out {dir}/c --teacher-url http://127.0.0.1:9 "
          "--teacher-model m", "{dir}/none.parquet: file not found"),
    _case("data build-pairs", "data build-pairs --curated {dir}/geo3k.parquet --samples {dir}/empty.jsonl "
          "--out {dir}/p.jsonl", "{dir}/geo3k.parquet, record 0, field 'teacher_response'"),
    _case("model tiny", "model tiny --out {dir}/t --spec {{\"hiden_size\":8}}", "--spec: unknown TinySpec field hiden_size"),
    _case("sft", "sft --config " + str(QS / "sft.yaml") + " model.path={tiny} data.train={dir}/empty.json "
          "output_dir={dir}/r_sft", "{dir}/empty.json: no usable training records", slow=True),
    _case("rl", "rl --config " + str(QS / "rl.yaml") + " model.path={tiny} data.train={dir}/empty.json data.eval= "
          "output_dir={dir}/r_rl", "{dir}/empty.json: no usable prompts", slow=True),
    _case("disc init", "disc init --from {dir}/none --out {dir}/d2", "--from {dir}/none: not a folder"),
    _case("disc pairs", "disc pairs --policy {tiny} --data {dir}/geo3k.parquet --out {dir}/pairs.jsonl",
          "{dir}/geo3k.parquet, record 0, field 'teacher_caption': missing", slow=True),
    _case("disc warmup", "disc warmup --config " + str(QS / "warmup.yaml") + " disc.path={disc} "
          "data.train={dir}/empty.jsonl output_dir={dir}/r_w", "{dir}/empty.jsonl: no warm-up pairs", slow=True),
    _case("align", "align --config " + str(QS / "align.yaml") + " model.path={tiny} disc.path={disc} "
          "data.train={dir}/geo3k.parquet output_dir={dir}/r_al",
          "{dir}/geo3k.parquet, record 0, field 'teacher_caption'", slow=True),
    _case("plot", "plot {dir}/no_run", "{dir}/no_run/metrics.jsonl: no metrics to plot"),
    _case("serve", "serve --model {dir}/none", "'{dir}/none' is not a folder"),
    _case("reward", "reward --input {dir}/bad.jsonl", "{dir}/bad.jsonl:2: invalid JSON"),
    _case("quickstart", "quickstart --out {dir}/q grpo_stepz=3", "unknown config key 'grpo_stepz'"),
]


@pytest.mark.parametrize("cmd,args,words", CASES)
def test_bad_input_ends_in_one_error_line(files, request, cmd, args, words):
    fill = {"dir": files["dir"], "tiny": files["tiny"]}
    if "{disc}" in args:
        fill["disc"] = request.getfixturevalue("disc")
    src = str(Path(prism_rl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    argv = [a.format(**fill) for a in args.split(" ")]
    proc = subprocess.run([sys.executable, "-m", "prism_rl.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"prism {cmd}: error: "), proc.stderr
    for w in words:
        assert w.format(**fill) in last, last
