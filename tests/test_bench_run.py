"""bench/run.py, the GPU benchmark harness: its counts and bounds, its inputs, its report, and a
CPU run of every suite at the tiny shape (the slow test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from harness import bounds, data, report  # noqa: E402
from harness.bounds import Counts  # noqa: E402
from harness.common import engine_factory, row  # noqa: E402


def _counts(**kw) -> Counts:
    base = dict(text_linear=100, head=10, vis_block=7, vis_merge=3, text_weight_bytes=1000, layers=2, heads=4,
                kv_heads=2, head_dim=8, vis_layers=1, vis_hidden=16)
    return Counts(**(base | kw))


@pytest.fixture(scope="module")
def processor():
    from harness.shapes import build_processor
    return build_processor(448)


def test_kv_bytes_per_token_is_k_and_v_of_every_layer_in_bf16():
    assert _counts().kv_bytes_per_token == 2 * 2 * 2 * 8 * 2   # K and V x layers x kv heads x head_dim x 2 bytes


def test_decode_seconds_memory_bound_counts_weights_and_live_kv_per_step():
    c = _counts()
    # rows: P = (3, 5), R = (3, 2). Steps t = 1, 2. t=1: both live, 4 + 6 = 10 cached tokens;
    # t=2: row 0 only (2 < 3, not 2 < 2), 5 cached tokens. A huge matmul rate makes bytes decide.
    secs = bounds.decode_seconds(c, [3, 5], [3, 2], bw=1.0, peak=1e30)
    assert secs == pytest.approx(2 * 1000 + c.kv_bytes_per_token * 15)


def test_decode_seconds_compute_bound_counts_matmuls_of_live_rows():
    c = _counts(text_weight_bytes=0)
    secs = bounds.decode_seconds(c, [3, 5], [3, 2], bw=1e30, peak=1.0)
    # FLOPs_t = 2 (N_text + N_head) rows_t + 4 L H d ctx_t; rows 2 then 1, ctx 10 then 5
    per_ctx = 4 * 2 * 4 * 8
    assert secs == pytest.approx(2 * 110 * 2 + per_ctx * 10 + 2 * 110 * 1 + per_ctx * 5)


def test_train_flops_is_three_forwards_with_causal_and_vision_attention():
    c = _counts()
    fwd = 2 * (100 * 30 + 10 * 12 + 7 * 8 + 3 * 8 / 4) + 2 * 2 * 4 * 8 * (10**2 + 20**2) + 4 * 1 * 16 * 8**2
    assert bounds.forward_flops(c, [10, 20], 12, [8]) == pytest.approx(fwd)
    assert bounds.train_flops(c, [10, 20], 12, [8]) == pytest.approx(3 * fwd)


def test_rollout_bound_prefills_each_distinct_prompt_once():
    c = _counts()
    calib = {"matmul_flops_per_s": 1.0, "copy_bytes_per_s": 1e30}
    one = bounds.rollout_bound_s(c, calib, [10], [8], [10, 10], [1, 1])
    assert one["decode_s"] == 0          # one token each comes from the prefill
    assert one["prefill_s"] == pytest.approx(bounds.forward_flops(c, [10], 1, [8]))
    step = bounds.rl_step_bound_s(c, calib, [10], [8], [10, 10], [1, 1], [8, 8])
    assert step == pytest.approx(one["total_s"] + bounds.train_flops(c, [11, 11], 2, [8, 8]))


@pytest.mark.parametrize("shape, params", [("2b", 2_127_532_032), ("4b", 4_437_815_808)])
def test_real_shapes_match_the_public_qwen3_vl_sizes(processor, shape, params):
    from harness.shapes import QWEN_TEXT, model_config
    from transformers import Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(model_config(shape, processor))
    assert sum(p.numel() for p in model.parameters()) == params
    t = QWEN_TEXT[shape]
    h, nh, nkv, d, inter = (t[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                             "intermediate_size"))
    c = Counts.of(model)
    assert c.text_linear == t["num_hidden_layers"] * (2 * h * nh * d + 2 * h * nkv * d + 3 * h * inter)
    assert c.head == 151936 * h
    merger = 4 * (4096 * 4096 + 4096 * h)          # the merger and three deepstack mergers, linear weights
    assert c.vis_merge == merger
    assert c.vis_block == 24 * (1024 * 3072 + 1024 * 1024 + 2 * 1024 * 4096) + 3 * 2 * 16 * 16 * 1024
    assert c.text_weight_bytes == 2 * (params - sum(p.numel() for p in model.model.visual.parameters()))


def test_448_px_images_keep_their_size_through_the_processor(processor):
    enc = data.prompts(processor, 2)
    assert [e.image_grid_thw.tolist() for e in enc] == [[[1, 28, 28]]] * 2
    assert all(int((e.input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 196
               for e in enc)


def test_synthetic_rollouts_have_the_asked_lengths_and_no_vision_tokens(processor):
    from prism_rl.models.loading import vision_token_ids
    enc = data.prompts(processor, 2)
    lens = data.response_lengths(6, 40)
    assert sorted(lens) == [20, 24, 28, 32, 36, 40]
    ro = data.synth_rollouts(processor, enc, 3, lens, vocab=500)
    assert ro.response_mask.sum(1).tolist() == lens
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    live = ro.response_ids[ro.response_mask.bool()]
    assert not torch.isin(live, torch.tensor(vision_token_ids(processor.tokenizer))).any()
    assert int(live.min()) >= 16 and int(live.max()) < 500
    assert ro.extras["patches_per_row"] == [784] * 6
    assert ro.pixel_values.shape[0] == 6 * 784


def test_trl_rows_hold_the_same_problem_and_image(processor):
    recs = data.records(2)
    rows = data.trl_rows(recs)
    assert rows[0]["image"].size == (448, 448)
    assert rows[0]["prompt"][1]["content"] == recs[0].messages[1]["content"].removeprefix("<image>")
    assert "<image>" not in json.dumps([r["prompt"] for r in rows])


def test_ratio_is_ours_speedup_for_rates_and_for_times():
    assert row("s", "c", "tokens/s", peer=100.0, ours=250.0)["ratio"] == pytest.approx(2.5)
    assert row("s", "c", "s/step", peer=10.0, ours=4.0, higher_is_better=False)["ratio"] == pytest.approx(2.5)
    assert row("s", "c", "tokens/s", peer=None, ours=4.0)["ratio"] is None


def test_engine_factory_without_make_engine_reports_graph_missing_and_keeps_hf(monkeypatch):
    import prism_rl.rollout as rollout_pkg
    monkeypatch.delattr(rollout_pkg, "make_engine", raising=False)
    make, label = engine_factory("graph")
    assert make is None and label.startswith("n/a (engine missing")
    make, label = engine_factory("hf")
    assert make is not None and label == "prism hf engine"


def _result(rows: list[dict]) -> dict:
    return {"meta": {"command": "python bench/run.py --suite train", "device": "NVIDIA H200", "versions": "torch 2.11",
                     "date": "2026-12-01 00:00 UTC", "commit": "abc", "reps": 3},
            "calib": {"copy_bytes": 2 << 30, "copy_bytes_per_s": 4.3e12, "matmul_n": 8192,
                      "matmul_flops_per_s": 7.9e14, "matmul_dtype": "bfloat16"},
            "rows": rows}


def test_table_formats_values_ratio_fraction_and_errors():
    rows = [row("train", "train 2B", "tokens/s", peer_name="hf", peer=1000.0, ours_name="prism", ours=1500.0,
                fraction=0.4, peer_fraction=0.27, note="MFU 40.0%"),
            row("rlstep", "GRPO step 2B", "", note="error: OutOfMemoryError: CUDA out of memory")]
    text = report.table(_result(rows))
    lines = text.splitlines()
    assert lines[2].startswith("| card: device-to-device copy") and "4.30 TB/s" in lines[2]
    assert "790.0 TFLOP/s" in lines[3]
    assert lines[4] == "| train 2B | 1,000 tok/s | 1,500 tok/s | 1.50x | MFU 40.0% (peer 27.0%) | MFU 40.0% |"
    assert lines[5] == "| GRPO step 2B | | | | | error: OutOfMemoryError: CUDA out of memory |"


def test_write_docs_replaces_only_its_section(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nintro\n\n## Other\n\nkept\n\nSee [RESULTS.md](RESULTS.md) for more.\n")
    first = _result([row("train", "train 2B", "tokens/s", peer=1.0, ours=2.0)])
    report.write_docs(doc, [first])
    text = doc.read_text()
    # no markers yet: the section goes before the first "## " section, headline numbers first
    assert text.startswith("# Performance\n\nintro\n\n" + report.BEGIN)
    assert text.index(report.END) < text.index("## Other") < text.index("kept")
    assert "| train 2B | 1 tok/s | 2 tok/s | 2.00x |" in text
    second = _result([row("train", "train 4B", "tokens/s", peer=3.0, ours=6.0)])
    report.write_docs(doc, [second])
    again = doc.read_text()
    assert "train 2B" not in again and "| train 4B |" in again
    assert again.count(report.BEGIN) == 1
    assert again[again.index(report.END):] == text[text.index(report.END):]   # the rest untouched
    assert again.startswith("# Performance\n\nintro\n\n" + report.BEGIN)


def test_render_reads_saved_results_and_rejects_other_json(tmp_path):
    good, bad = tmp_path / "r.json", tmp_path / "x.json"
    report.save(good, _result([row("train", "train 2B", "tokens/s", peer=1.0, ours=2.0)]))
    bad.write_text(json.dumps({"rows": []}))
    assert report.load(good)["rows"][0]["config"] == "train 2B"
    with pytest.raises(ValueError, match="x.json: not a bench/run.py result"):
        report.load(bad)


@pytest.mark.slow
def test_cpu_smoke_runs_every_suite_and_writes_the_docs_section(tmp_path):
    out, doc = tmp_path / "r.json", tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu", "--shape", "tiny",
                           "--suite", "all", "--quick", "--ours-engine", "hf", "--out", str(out), "--write-docs",
                           "--docs", str(doc)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_suite = {s: [r for r in rows if r["suite"] == s] for s in ("rollout", "train", "rlstep")}
    assert [len(v) for v in by_suite.values()] == [2, 1, 3]
    for r in by_suite["rollout"] + by_suite["train"] + by_suite["rlstep"][:2]:
        assert r["peer"] > 0 and r["ours"] > 0 and r["ratio"] > 0 and 0 < r["fraction"] < 1, r
    assert "| memory TINY" in doc.read_text() and report.BEGIN in doc.read_text()


def test_update_profile_smoke_times_each_variant_on_the_same_rows(tmp_path):
    """bench/update_profile.py on the CPU: every asked variant updates the same rows (same tokens
    and model FLOPs), its MFU is those FLOPs over its median time at the calibrated peak, and the
    first variant (the base) is the one profiled, its ops listed with their input shapes."""
    import update_profile
    out = tmp_path / "u.json"
    update_profile.main(["--smoke", "--reps", "1", "--variants", "base,per row,frozen", "--out", str(out)])
    saved = json.loads(out.read_text())
    res = saved["results"]
    assert [r["variant"] for r in res] == [v.name for v in update_profile.VARIANTS
                                           if any(s in v.name for s in ("base", "per row", "frozen"))]
    assert len({(r["tokens"], r["model_flops"]) for r in res}) == 1 and res[0]["tokens"] > 0
    for r in res:
        assert r["update_s"] == sorted(r["updates_s"])[len(r["updates_s"]) // 2]
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["update_s"] / saved["calib"]["matmul_flops_per_s"])
    assert "profile" in res[0] and all("profile" not in r for r in res[1:])
    ops = res[0]["profile"]["top_ops"]   # on the CPU: self CPU time, so the attention and matmuls show
    assert ops and all(o["op"].startswith("aten::") and o["calls"] > 0 for o in ops)
    assert [o["s"] for o in ops] == sorted((o["s"] for o in ops), reverse=True)
    assert any(o["op"] == "aten::mm" and o["shapes"].startswith("[[") for o in ops)
    assert res[0]["profile"]["host_waits"]["calls"] == 0   # no GPU to wait for
    sites = res[0]["profile"]["copy_sites"]   # copies by the code that made them
    assert sites and all(c["op"] in update_profile.COPY_OPS and c["calls"] > 0 for c in sites)
    assert [c["s"] for c in sites] == sorted((c["s"] for c in sites), reverse=True)
    assert any("prism_rl" in c["site"] or "transformers" in c["site"] for c in sites)
    waits = res[0]["profile"]["sync_sites"]   # what would make a GPU's host wait, by caller
    assert waits and all(w["op"] in update_profile.SYNC_OPS for w in waits)
    assert any("shared_vision.py" in w["site"] and w["op"] == "aten::equal" for w in waits)   # copies found by value


def test_sampler_probe_smoke_under_the_interpreter(tmp_path):
    """bench/sampler_probe.py on the CPU (TRITON_INTERPRET=1, a subprocess: the flag is read when
    Triton is imported): every mode at 4 rows; greedy and seeded draws of the kernel are the torch
    path's, and every log-prob is log_softmax of the drawn token."""
    import os
    out = tmp_path / "s.json"
    env = os.environ | {"TRITON_INTERPRET": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sampler_probe.py"), "--smoke", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [(r["rows"], r["mode"]) for r in res] == [(4, "greedy"), (4, "unseeded"), (4, "seeded")]
    assert [r["same_tokens"] for r in res] == [True, None, True]
    assert all(r["lp_diff_vs_log_softmax"] < 1e-5 for r in res)
    assert res[2]["lp_diff_vs_torch"] < 1e-5 and all(r["speedup"] == r["torch_s"] / r["kernel_s"] for r in res)
