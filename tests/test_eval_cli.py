"""``prism eval`` through the CLI entry point: every flag and override honoured or refused,
the settings in force printed first, results kept per run (two checkpoints both called
``final`` keep both), reruns resuming, and the comparison table where the README says."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from prism_rl.cli import main
from prism_rl.data.synth import synthesize
from prism_rl.eval.benchmark_scoring import score_response
from prism_rl.eval.benchmark_table import BENCHMARKS
from prism_rl.eval.layout import derive_run_name
from prism_rl.eval.loaders import load_benchmark
from prism_rl.format import make_response

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """A held-out file of 4 synthetic problems."""
    out = tmp_path_factory.mktemp("data")
    synthesize(out, 16, 0)
    return out / "test.parquet"


@pytest.fixture
def two_finals(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """Two checkpoints, both ``.../rl/final``, in different places."""
    a, b = tmp_path / "exp1" / "rl" / "final", tmp_path / "exp2" / "rl" / "final"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    return a, b


def _eval(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_run_names_are_readable_and_unique():
    assert derive_run_name("/x/runs/rl/final") == "rl-final"
    assert derive_run_name("/x/runs/quickstart/align/final/policy") == "align-final-policy"
    assert derive_run_name("/x/sft/checkpoint-40") == "sft-checkpoint-40"
    assert derive_run_name("/models/Qwen3-VL-4B-Instruct") == "Qwen3-VL-4B-Instruct"
    assert derive_run_name("/x/my run (v2)/final") == "my_run_v2_-final"


def test_two_checkpoints_named_final_keep_both_results(two_finals, heldout, tmp_path, capsys):
    a, b = two_finals
    root = tmp_path / "evals"
    rc, out, err = _eval(capsys, "--model", a, "--data", heldout, "--out", root, "--max-new-tokens", 6, "--limit", 3)
    assert rc == 0, err
    first = out.splitlines()[0]
    assert first == (f"prism eval: held-out {heldout}, 3 problems, n 1, max_new_tokens 6 (--max-new-tokens), "
                     f"temperature 0.0 (default), top_p 1.0 (default)")
    assert out.splitlines()[1].startswith(f"prism eval: run rl-final (model {a.resolve()}) -> {root / 'rl-final'}")
    rc, out, err = _eval(capsys, "--model", b, "--data", heldout, "--out", root, "--max-new-tokens", 6, "--limit", 3)
    assert rc == 0, err
    b_name = "rl-final-" + hashlib.sha1(str(b.resolve()).encode()).hexdigest()[:6]
    for name, model in (("rl-final", a), (b_name, b)):
        part = root / name / "heldout-test"
        summary = json.loads((part / "summary.json").read_text())
        assert summary["model"] == str(model.resolve()) and summary["run"] == name
        assert summary["overall"]["n_prompts"] == 3                       # --limit honoured
        rows = _rows(part / "samples.jsonl")
        assert len(rows) == 3 and all(1 <= r["tokens"] <= 6 for r in rows)  # --max-new-tokens honoured
        assert json.loads((root / name / "run.json").read_text())["model"] == str(model.resolve())
    md = (root / "results.md").read_text()
    table = md.split("Score (%)")[1].split("Mean response tokens")[0]
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| rl-final")] == \
        ["| rl-final", f"| {b_name}"]
    assert "| run | held-out test |" in table
    assert len((root / "results.csv").read_text().splitlines()) == 3
    assert f"comparison table of every run under {root}: {root / 'results.md'}" in out and f"| {b_name} |" in out
    assert not (tmp_path / "results.md").exists()


def test_rerun_resumes_extends_and_fresh_starts_over(tiny_model_dir, heldout, tmp_path, capsys):
    root = tmp_path / "evals"
    base = ("--model", tiny_model_dir, "--data", heldout, "--out", root, "--max-new-tokens", 5, "--name", "tiny")
    assert _eval(capsys, *base, "--limit", 2)[0] == 0
    samples = root / "tiny" / "heldout-test" / "samples.jsonl"
    first = _rows(samples)
    rc, out, _ = _eval(capsys, *base, "--limit", 2)
    assert rc == 0 and "2 of 2 already done, resuming" in out.splitlines()[1]
    assert _rows(samples) == first
    rc, out, _ = _eval(capsys, *base, "--limit", 4)                        # a larger limit adds the rest
    assert rc == 0 and "2 of 4 already done" in out
    assert _rows(samples)[:2] == first and len(_rows(samples)) == 4
    summary = json.loads((samples.parent / "summary.json").read_text())
    assert (summary["generated_now"], summary["resumed"], summary["overall"]["n_prompts"]) == (2, 2, 4)
    rc, _, err = _eval(capsys, *base[:-4], "--max-new-tokens", 7, "--name", "tiny", "--limit", 4)
    assert rc == 2 and err.startswith("prism eval: error: ") and "Traceback" not in err
    assert "max_new_tokens 5 there, 7 now" in err and "--fresh" in err
    rc, out, _ = _eval(capsys, *base[:-4], "--max-new-tokens", 7, "--name", "tiny", "--limit", 1, "--fresh")
    assert rc == 0 and "resuming" not in out
    assert [r["id"] for r in _rows(samples)] == [first[0]["id"]]


def test_a_name_holding_another_model_is_refused(two_finals, heldout, tmp_path, capsys):
    a, b = two_finals
    root = tmp_path / "evals"
    assert _eval(capsys, "--model", a, "--data", heldout, "--out", root, "--name", "mine", "--limit", 1,
                 "--max-new-tokens", 4)[0] == 0
    rc, _, err = _eval(capsys, "--model", b, "--data", heldout, "--out", root, "--name", "mine", "--limit", 1)
    assert rc == 2 and f"holds results of model {a.resolve()}" in err and "--name" in err
    assert len(_rows(root / "mine" / "heldout-test" / "samples.jsonl")) == 1  # untouched


@pytest.mark.parametrize("args, message", [
    (("nonsense.key=1",), "unknown config key 'nonsense'"),
    (("--benchmark", "mathvision", "nonsense.key=1"), "unknown config key 'nonsense'"),
    (("--benchmark", "mathvision", "data.bogus=1"), "unknown config key 'data.bogus'"),
    (("--limit", 0), "--limit: Input should be greater than 0 (got 0)"),
    (("--judge-url", "http://x/v1", "--judge-model", "j"), "--judge-url: applies to --benchmark only"),
    (("--benchmark", "mathvision", "--judge-url", "http://x/v1"), "--judge-url and --judge-model go together"),
    (("--benchmark", "mathvision", "generation.n=2"), "generation.n=2: a benchmark is evaluated with one response"),
    (("--benchmark", "gsm8k"), "unknown benchmark 'gsm8k' (--benchmark)"),
    (("model.freeze_vision=true",), "model.freeze_vision: a training setting"),
    (("--report",), "--report rebuilds the comparison table only and takes only --out, not --model, --data"),
])
def test_bad_flags_and_overrides_are_refused(tiny_model_dir, heldout, tmp_path, capsys, args, message):
    data = FIX / "mathvision" if "--benchmark" in args else heldout
    rc, out, err = _eval(capsys, "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "evals", *args)
    assert rc == 2 and err.startswith("prism eval: error: ") and message in err, err
    assert not (tmp_path / "evals").exists()  # refused before anything is written


def test_missing_model_or_data_is_named(tmp_path, heldout, tiny_model_dir, capsys):
    rc, _, err = _eval(capsys, "--model", tmp_path / "nope" / "final", "--data", heldout, "--out", tmp_path / "e")
    assert rc == 2 and "model.path (--model)" in err and "nope/final" in err
    rc, _, err = _eval(capsys, "--model", tiny_model_dir, "--data", tmp_path / "missing.parquet", "--out", tmp_path / "e")
    assert rc == 2 and "data.eval (--data)" in err and "missing.parquet" in err
    assert not (tmp_path / "e").exists()


def _bad_mathvision(tmp_path: Path) -> Path:
    """The MathVision fixture plus a record without an answer (record 3)."""
    src = FIX / "mathvision"
    dst = tmp_path / "mathvision"
    shutil.copytree(src, dst)
    lines = (dst / "data" / "testmini.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad.update(id="bad-1", answer="")
    (dst / "data" / "testmini.jsonl").write_text("\n".join([*lines, json.dumps(bad)]) + "\n")
    return dst


def test_benchmark_honours_overrides_out_and_prints_the_cap(tiny_model_dir, tmp_path, capsys):
    data, root = _bad_mathvision(tmp_path), tmp_path / "evals"
    args = ("--benchmark", "MathVision", "--model", tiny_model_dir, "--data", data, "--out", root,
            "--max-new-tokens", 4, "generation.top_p=0.9", "generation.batch_size=2")
    rc, _, err = _eval(capsys, *args)
    assert rc == 2 and "record 3, field 'answer'" in err               # without data.skip_bad
    rc, out, err = _eval(capsys, *args, "data.skip_bad=true")
    assert rc == 0, err
    assert out.splitlines()[0] == ("prism eval: mathvision testmini, 3 problems, max_new_tokens 4 (--max-new-tokens), "
                                   "temperature 1.0 (benchmark default), top_p 0.9 (config)")
    name = derive_run_name(tiny_model_dir)
    part = root / name / "mathvision"
    summary = json.loads((part / "summary.json").read_text())
    assert summary["bad_records"] == 1 and summary["n_records"] == 3
    assert summary["settings"]["top_p"] == 0.9 and summary["settings"]["max_new_tokens"] == 4
    assert all(r["tokens"] <= 4 for r in _rows(part / "samples.jsonl"))
    assert (root / "results.md").exists() and not (tmp_path / "results.md").exists()  # not the parent of --out
    assert f"| {name} | - | - |" in (root / "results.md").read_text()
    rc, out, _ = _eval(capsys, "--report", "--out", root)
    assert rc == 0 and f"| {name} | - | - |" in out


def test_benchmark_defaults_are_the_benchmarks_own(tiny_model_dir, tmp_path, capsys):
    """Without --max-new-tokens the cap is the benchmark's (MathVision 49152), said first. The
    samples are already there (made with those settings), so nothing is generated."""
    spec, root = BENCHMARKS["mathvision"], tmp_path / "evals"
    part = root / "prefilled" / "mathvision"
    part.mkdir(parents=True)
    recs = load_benchmark("mathvision", FIX / "mathvision")
    rows = [score_response(r, make_response("- a figure", "so", r.ground_truth)) for r in recs]
    (part / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (part / "meta.json").write_text(json.dumps({
        "model": str(Path(tiny_model_dir).resolve()), "max_new_tokens": spec.max_new_tokens,
        "temperature": spec.temperature, "top_p": spec.top_p, "seed": 0, "max_prompt_length": 32768,
        "max_pixels": None, "min_pixels": None}))
    rc, out, err = _eval(capsys, "--benchmark", "mathvision", "--model", tiny_model_dir, "--data", FIX / "mathvision",
                         "--out", root, "--name", "prefilled")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == ("prism eval: mathvision testmini, 3 problems, max_new_tokens 49152 (benchmark default), "
                        "temperature 1.0 (benchmark default), top_p 0.7 (benchmark default)")
    assert "3 of 3 already done, resuming" in lines[1]
    assert lines[2].startswith("MVision accuracy over testmini: 100.0% (rules 100.0%)")
    # the same run with a cap of its own is another setting: refused, not mixed in
    rc, _, err = _eval(capsys, "--benchmark", "mathvision", "--model", tiny_model_dir, "--data", FIX / "mathvision",
                       "--out", root, "--name", "prefilled", "--max-new-tokens", 64)
    assert rc == 2 and "max_new_tokens 49152 there, 64 now" in err


def test_setting_one_generation_key_keeps_greedy_decoding():
    """Held-out eval is greedy by default; an override of another generation key used to
    rebuild the section from the class defaults and switch sampling on (temperature 1.0)."""
    from prism_rl.config import EvalConfig, load_config

    assert load_config(EvalConfig, None, []).generation.temperature == 0.0
    assert load_config(EvalConfig, None, ["generation.batch_size=8"]).generation.temperature == 0.0
    assert load_config(EvalConfig, None, ["generation.temperature=0.7"]).generation.temperature == 0.7


def test_heldout_eval_applies_the_pixel_limits(tiny_model_dir):
    """data.max_pixels / data.min_pixels reach the processor the held-out eval encodes with
    (they were accepted and ignored)."""
    from prism_rl.config import EvalConfig, load_config
    from prism_rl.eval.evaluate import _load

    cfg = load_config(EvalConfig, None, [f"model.path={tiny_model_dir}", "data.max_pixels=3136", "data.min_pixels=784"])
    _, processor = _load(cfg)
    size = processor.image_processor.size
    assert (size["longest_edge"], size["shortest_edge"]) == (3136, 784)


def test_heldout_eval_scores_perception_when_records_have_scenes(tiny_model_dir, heldout, tmp_path, capsys):
    import pyarrow.parquet as pq

    from prism_rl.eval.perception import response_perception

    scenes = {r["extra_info"]["index"]: r["scene"] for r in pq.read_table(heldout).to_pylist()}
    root = tmp_path / "evals"
    rc, out, _ = _eval(capsys, "--model", tiny_model_dir, "--data", heldout, "--out", root, "--max-new-tokens", 12,
                       "--name", "p", "--limit", 3)
    assert rc == 0 and "perception" in out
    rows = _rows(root / "p" / "heldout-test" / "samples.jsonl")
    assert len(rows) == 3 and len(scenes) >= 3
    expect = [response_perception(r["response"], s) for r, s in zip(rows, scenes.values())]
    assert [r["perception"] for r in rows] == expect
    summary = json.loads((root / "p" / "heldout-test" / "summary.json").read_text())
    assert summary["overall"]["perception"] == pytest.approx(sum(expect) / 3) and summary["overall"]["n_perception"] == 3
    # a file without the scene column (older data, other sources): no perception, no error
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(heldout).drop(["scene"]), plain)
    assert _eval(capsys, "--model", tiny_model_dir, "--data", plain, "--out", root, "--max-new-tokens", 12,
                 "--name", "q", "--limit", 2)[0] == 0
    rows = _rows(root / "q" / "heldout-plain" / "samples.jsonl")
    assert len(rows) == 2 and all("perception" not in r for r in rows)
    assert "perception" not in json.loads((root / "q" / "heldout-plain" / "summary.json").read_text())["overall"]
