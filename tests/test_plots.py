"""``prism plot``: which panels a run's metrics give (the alignment dynamics of issue 16)."""

import json

from prism_rl.plots import drawn_panels, plot_run


def test_alignment_rows_draw_gap_accuracy_and_perception_panels(tmp_path):
    rows = [{"step": s, "disc/cap_gap": 0.1 * s, "rollout/perception": 0.2 + 0.01 * s, "rollout/format": 1.0,
             "disc/expert_load": [0.5, 0.5]} for s in (1, 2, 3)]
    panels = dict(drawn_panels(rows + [{"step": 3, "event": "saved", "rollout/acc": 0.5}]))
    assert panels == {"teacher - student score gap": ["disc/cap_gap"], "format rate": ["rollout/format"],
                      "perception score (caption facts right)": ["rollout/perception"]}   # an event row draws nothing
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [p.name for p in plot_run(tmp_path)] == ["training_curves.png", "expert_load.png"]
