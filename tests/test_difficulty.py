"""The difficulty filter: kept rows are the input's rows unchanged plus the filter's columns;
samples that hit the token cap are counted apart; the response limit defaults to RLVR's."""

import inspect
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_rl.cli import build_parser, main
from prism_rl.config import RLConfig
from prism_rl.data.layouts import read_records
from prism_rl.data.records import DataError
from prism_rl.data.subset import write_subset
from prism_rl.jobs.difficulty import ProblemScore, filter_difficulty, filter_stats
from prism_rl.trainers.warmup import sample_pairs

from conftest import png_bytes

FILTER_COLUMNS = {"pass_rate": pa.float64(), "truncated_samples": pa.int64()}


def _verl_rows(k=3):
    """verl-style rows as a user's RL set has them: ``ability`` and ``extra_info.answer`` are not
    columns prism itself writes; the ground truths cannot be matched by a sampled answer."""
    return [{"data_source": f"geo{i % 2}",
             "prompt": [{"role": "system", "content": "Answer in tags."},
                        {"role": "user", "content": f"<image>Problem {i}: how many sides?"}],
             "images": [{"bytes": png_bytes(shape="square" if i % 2 else "circle")}],
             "ability": "math",
             "reward_model": {"ground_truth": f"zz-unmatchable-{i}", "style": "rule"},
             "extra_info": {"split": "train", "index": 100 + i, "answer": f"zz-unmatchable-{i}",
                            "question": f"Problem {i}: how many sides?"}}
            for i in range(k)]


def _write_verl(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _filter(tiny_model_dir, data, out, low, high, *extra):
    return main(["data", "filter-difficulty", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--n", "2", "--low", str(low), "--high", str(high), "--seed", "0", *extra])


def test_kept_rows_are_the_input_rows_plus_filter_columns(tiny_model_dir, tmp_path, capsys):
    data = _write_verl(tmp_path / "problems.parquet", _verl_rows())
    rl = tmp_path / "rl.yaml"
    rl.write_text("rollout:\n  max_new_tokens: 3\n")
    out = tmp_path / "kept" / "rl.parquet"
    assert _filter(tiny_model_dir, data, out, 0.0, 1.0, "--rl-config", str(rl)) == 0   # keep every problem
    src, got = pq.read_table(data), pq.read_table(out)
    assert got.schema == src.schema.append(pa.field("pass_rate", pa.float64())).append(
        pa.field("truncated_samples", pa.int64()))
    rows = got.to_pylist()
    assert [{k: v for k, v in r.items() if k not in FILTER_COLUMNS} for r in rows] == src.to_pylist()
    assert [r["pass_rate"] for r in rows] == [0.0, 0.0, 0.0]        # no answer can match
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["max_new_tokens"] == 3 and stats["max_new_tokens_from"] == str(rl)
    cut = stats["truncation"]
    assert cut["samples"] == 6 and cut["truncated"] == sum(r["truncated_samples"] for r in rows) > 0
    assert cut["truncated_wrong"] == cut["truncated"]               # every sample is wrong here
    assert cut["below_low_with_truncation"] == 0                    # low is 0: nothing is below it
    console = capsys.readouterr()
    assert json.loads(console.out)["truncation"] == cut
    assert f"{cut['truncated']} of 6 samples hit max_new_tokens=3 ({cut['truncated']} of them scored wrong" in console.err
    assert len(read_records(out)) == 3                              # the RL stage reads it back


def test_empty_result_keeps_the_full_schema(tiny_model_dir, tmp_path):
    data = _write_verl(tmp_path / "problems.parquet", _verl_rows())
    out = tmp_path / "rl.parquet"
    assert _filter(tiny_model_dir, data, out, 0.5, 1.0, "--max-new-tokens", "2") == 0   # every rate is 0
    got = pq.read_table(out)
    assert got.num_rows == 0
    assert got.schema.names == [*pq.read_table(data).schema.names, "pass_rate", "truncated_samples"]
    assert got.schema.field("ability").type == pa.string()
    assert got.schema.field("extra_info").type == pq.read_table(data).schema.field("extra_info").type
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["kept"] == 0 and stats["never_solved"] == 3 and stats["max_new_tokens_from"] == "max_new_tokens"


def test_response_limit_defaults_to_rlvr_and_is_one_choice():
    parser = build_parser()
    base = ["--model", "m", "--data", "d.parquet", "--out", "o.parquet"]
    for argv in (["data", "filter-difficulty", *base], ["disc", "pairs", "--policy", "m", "--data", "d", "--out", "o"]):
        args = parser.parse_args(argv)
        assert args.max_new_tokens is None and args.rl_config is None   # resolved to rl_response_limit()
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "filter-difficulty", *base, "--max-new-tokens", "5", "--rl-config", "x.yaml"])
    for fn in (filter_difficulty, sample_pairs):
        assert inspect.signature(fn).parameters["max_new_tokens"].default is None
    assert RLConfig().rollout.max_new_tokens == 8192


def test_filter_stats_counts_truncation_apart():
    class R:
        def __init__(self, task):
            self.task = task
    scores = [ProblemScore(0.0, 4, 4),     # never solved, every sample cut off: the cap, not the problem?
              ProblemScore(0.0, 0, 0),     # never solved, nothing cut
              ProblemScore(0.5, 1, 1),     # kept
              ProblemScore(1.0, 1, 0)]     # always solved, one long sample still right
    stats = filter_stats([R("a"), R("a"), R("b"), R("b")], scores, n=4, low=0.2, high=0.8, bad_records=0)
    assert (stats["kept"], stats["never_solved"], stats["always_solved"]) == (1, 2, 1)
    assert stats["truncation"] == {"samples": 16, "truncated": 6, "truncated_wrong": 5, "truncated_rate": 6 / 16,
                                   "problems_with_truncation": 3, "below_low_with_truncation": 1}
    assert stats["kept_by_task"] == {"a": 0, "b": 1}


def test_subset_of_jsonl_keeps_objects_and_rebases_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    objs = [{"messages": [{"role": "user", "content": f"<image>q{i}"}, {"role": "assistant", "content": "a"}],
             "images": ["img/a.png"], "ground_truth": str(i), "meta": {"level": i, "tags": ["x"]}}
            for i in range(3)]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in objs) + "\n\n")
    out = tmp_path / "sub" / "deeper" / "k.jsonl"
    write_subset(src, out, [2, 0], {"pass_rate": (float, [0.5, 0.25])})
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # still the same file: by its absolute path, as a relative one would climb out of the folder
    assert [g["images"] for g in got] == [[str(tmp_path / "img" / "a.png")]] * 2
    assert [{k: v for k, v in g.items() if k not in ("images", "pass_rate")} for g in got] == \
        [{k: v for k, v in objs[i].items() if k != "images"} for i in (2, 0)]
    assert [g["pass_rate"] for g in got] == [0.5, 0.25]
    assert read_records(out)[0].load_images()[0].size == (96, 96)
    with pytest.raises(DataError, match="must be a .jsonl file like the input"):
        write_subset(src, tmp_path / "k.parquet", [0], {})


def test_subset_of_parquet_rebases_path_images_and_replaces_a_filter_column(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [dict(r, images=[{"bytes": None, "path": "a.png"}], pass_rate=0.9) for r in _verl_rows(2)]
    src = _write_verl(tmp_path / "p.parquet", rows)
    out = tmp_path / "sub" / "k.parquet"
    write_subset(src, out, [1], {"pass_rate": (float, [0.25])})
    got = pq.read_table(out)
    assert got.schema == pq.read_table(src).schema        # pass_rate replaced in place, not added twice
    row = got.to_pylist()[0]
    assert row["images"] == [{"bytes": None, "path": str(tmp_path / "a.png")}] and row["pass_rate"] == 0.25
    assert {k: v for k, v in row.items() if k not in ("images", "pass_rate")} == \
        {k: v for k, v in rows[1].items() if k not in ("images", "pass_rate")}
    assert read_records(out)[0].load_images()[0].size == (96, 96)
