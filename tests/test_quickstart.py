"""The quick start's plan and results table (the full run is `make quickstart`)."""

import json
import statistics
import sys

import pytest

from prism_rl.cli import build_parser
from prism_rl.config import load_config
from prism_rl.quickstart import QuickstartSettings, plan, results_table


def test_every_planned_command_parses_and_stages_are_ordered(tmp_path):
    s = load_config(QuickstartSettings, None, ["rl_seeds=[0,1,2]"])
    lanes = plan(tmp_path, s, seed=0)
    labels = [label for lane in lanes for label, _, _ in lane.stages]
    assert labels[:3] == ["synth", "tiny-model", "sft"]
    assert labels.index("disc-warmup") < labels.index("align") < labels.index("eval-aligned")
    assert sum(label.startswith("sft_grpo-s") for label in labels) == 3
    assert sum(label.startswith("prism_grpo-s") for label in labels) == 3
    by_name = {lane.name: lane for lane in lanes}
    assert by_name["prism_grpo-0"].after == ("eval-sft", "discriminator")   # needs the filter and align
    assert by_name["sft_grpo-0"].after == ("eval-sft",)                     # needs only the filter
    parser = build_parser()
    for lane in lanes:
        for label, argv, done in lane.stages:
            assert argv[1:3] == ["-m", "prism_rl.cli"]
            args = parser.parse_args(argv[3:])          # flags and subcommands exist
            assert args.fn is not None, label
            assert str(done).startswith(str(tmp_path))
            if label in ("filter", "disc-pairs"):
                # the CLI defaults to RLVR's 8192-token limit; the CPU quick start keeps its small one
                assert args.max_new_tokens == 200, label


def test_lane_scheduler_respects_dependencies(tmp_path):
    from prism_rl.quickstart import Lane, run_lanes
    log = tmp_path / "order.txt"
    touch = lambda name: [sys.executable, "-c", f"open({str(log)!r}, 'a').write({name!r} + '\\n'); "
                                                f"open({str(tmp_path / (name + '.done'))!r}, 'w')"]
    lanes = [Lane("c", after=("a", "b")).add("c", touch("c"), tmp_path / "c.done"),
             Lane("a").add("a", touch("a"), tmp_path / "a.done"),
             Lane("b", after=("a",)).add("b", touch("b"), tmp_path / "b.done")]
    run_lanes(lanes, tmp_path, workers=2)
    assert log.read_text().split() == ["a", "b", "c"]


def test_a_stage_that_exits_0_without_its_output_stops_the_lane(tmp_path):
    """A training stage stopped by SIGTERM/SIGINT exits 0 with a checkpoint and no final
    folder: the lane stops there instead of starting the next stage on a missing input."""
    from prism_rl.quickstart import Lane, run_lanes
    ran = tmp_path / "second.ran"
    lane = Lane("a").add("first", [sys.executable, "-c", "print('stopped by SIGTERM after step 3')"], tmp_path / "x.done")
    lane.add("second", [sys.executable, "-c", f"open({str(ran)!r}, 'w')"], tmp_path / "y.done")
    with pytest.raises(RuntimeError, match=r"stage 'first' stopped before writing .*x\.done.*\n.*stopped by SIGTERM"):
        run_lanes([lane], tmp_path, workers=1)
    assert not ran.exists()


def _summary(acc, per_task):
    return {"overall": {"accuracy": acc, "format_rate": 1.0, "mean_response_tokens": 80.0},
            "per_task": {t: {"accuracy": a} for t, a in per_task.items()}}


def test_results_table_mean_and_std(tmp_path):
    ev = tmp_path / "eval"
    for name, acc in [("sft", 0.30), ("sft_grpo_s0", 0.40), ("sft_grpo_s1", 0.44), ("aligned", 0.33),
                      ("prism_grpo_s0", 0.50), ("prism_grpo_s1", 0.46)]:
        (ev / name / "heldout-test").mkdir(parents=True)
        (ev / name / "heldout-test" / "summary.json").write_text(json.dumps(_summary(acc, {"count": acc, "chart": acc / 2})))
    table = results_table(tmp_path, [0, 1])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"SFT", "SFT+GRPO", "PRISM (aligned)", "PRISM+GRPO"}
    sd = 100 * statistics.stdev([0.40, 0.44])
    assert f"42.0 ± {sd:.1f}" in rows["SFT+GRPO"] and rows["SFT+GRPO"].endswith("| 2 |")
    assert "30.0" in rows["SFT"] and "48.0 ±" in rows["PRISM+GRPO"]
