"""Curation pipeline and warm-up pair builder, end to end over real HTTP.

The teacher and judge are ``tests/fault_server.py`` (a loopback OpenAI-compatible server
with seeded, deterministic faults) or ``prism serve`` (run as its own process) with
the tiny model. The pipeline talks to both with the real ``openai`` client.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prism_rl.data.curate import (
    HINT_TEMPLATE,
    CurationError,
    Endpoint,
    _alignment_count,
    _Caller,
    curate,
    parse_disambiguation,
    parse_verdict,
    quality_key,
)
from prism_rl.data.layouts import read_pairs, read_records, write_jsonl, write_verl_parquet
from prism_rl.data.pairs import build_pairs
from prism_rl.data.records import BadRecords, DataError
from prism_rl.format import is_format_valid, make_response, split_text

from fault_server import FaultRates, FaultServer, make_problems, write_problem_file

ROOT = Path(__file__).resolve().parents[1]
RATES = FaultRates(timeout=0.04, rate_limit=0.1, server_error=0.1, truncated=0.1,
                   malformed=0.1, wrong=0.15, alias=0.1)
# The client timeout leaves room for a loaded 2-core machine; injected delays exceed it.
TIMEOUT_S, DELAY_S = 1.5, 2.0
FAST = dict(timeout_s=TIMEOUT_S, backoff_base_s=0.01, max_retries=5)


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- reply parsing


@pytest.mark.parametrize("text,expected", [
    ("CORRECT", True), ("INCORRECT", False), ("**Correct**", True), ("incorrect.", False),
    ('{"verdict": "correct"}', True), ('```json\n{"correct": false}\n```', False),
    ("Verdict: INCORRECT - the candidate says 8", False),
    ("<think>is it correct? maybe wrong</think>\nCORRECT", True),
    ("The candidate answer is not correct.", False), ("Yes, they are equivalent.", True),
    ("INCORRECT. A correct answer would be 7.", False), ("I cannot tell.", None), ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) is expected


def test_parse_disambiguation():
    assert parse_disambiguation("SINGLE") == ("single", None)
    assert parse_disambiguation("<think>two parts</think>REWRITTEN:\nHow many red?") == \
        ("rewritten", "How many red?")
    assert parse_disambiguation("REWRITTEN:   ") == ("unparsed", None)
    assert parse_disambiguation("sure!") == ("unparsed", None)


# --------------------------------------------------------------------------- policy units


def test_backoff_is_exponential_capped_and_seeded():
    caller = _Caller(timeout_s=1, max_retries=5, backoff_base_s=0.5, max_tokens=8)
    a = [caller.backoff(k, random.Random("0:p1"), None) for k in range(8)]
    b = [caller.backoff(k, random.Random("0:p1"), None) for k in range(8)]
    assert a == b
    for k, d in enumerate(a):
        full = min(30.0, 0.5 * 2 ** k)
        assert full / 2 <= d <= full
    assert caller.backoff(0, random.Random(1), retry_after=2.0) == 2.0


def test_quality_order_and_alignment_count():
    base = {"hinted": False, "first_try": False, "accepted_by": "rules"}
    rs = [
        {**base, "id": "e", "hinted": True, "accepted_by": "judge", "response": "x"},
        {**base, "id": "d", "hinted": True, "response": "x"},
        {**base, "id": "c", "accepted_by": "judge", "response": "x"},
        {**base, "id": "b", "response": "x"},
        {**base, "id": "a2", "first_try": True, "response": "xx"},
        {**base, "id": "a1", "first_try": True, "response": "xx"},
        {**base, "id": "a0", "first_try": True, "response": "x" * 5},
        {**base, "id": "a", "first_try": True, "response": "x"},
    ]
    assert [r["id"] for r in sorted(rs, key=quality_key)] == \
        ["a", "a1", "a2", "a0", "b", "c", "d", "e"]
    assert [_alignment_count(n, 0.05) for n in (0, 1, 10, 30, 113)] == [0, 1, 1, 2, 6]
    assert _alignment_count(10, 0.0) == 0


# --------------------------------------------------------------------------- end to end


def test_end_to_end_against_fault_server(tmp_path):
    problems = make_problems(30, multi_every=6)
    path = tmp_path / "problems.parquet"
    write_problem_file(problems, path)
    forced = {"p001": ["wrong", "ok"], "p002": ["alias"], "p004": ["truncated", "malformed", "ok"],
              "p005": ["ok"] * 3}
    server = FaultServer(problems, RATES, seed=3, delay_s=DELAY_S, forced=forced,
                         always_wrong={"p005"}, bad_request={"p007"})
    out = tmp_path / "out"
    with server:
        t0 = time.monotonic()
        report = curate(path, out, teacher=Endpoint(server.base_url, "teacher"),
                        judge=Endpoint(server.base_url, "judge"), disambiguate=True,
                        concurrency=8, seed=1, **FAST)
        wall = time.monotonic() - t0
        counts = dict(server.counts)
    print(f"\nfault server: {report.finished} problems in {wall:.2f} s = "
          f"{report.run['problems_per_min']:.0f} problems/min; errors {report.errors_by_cause}; "
          f"retries {report.retries_by_cause}; server counts {counts}")

    # Every problem ends accepted or rejected with a reason; the report adds up.
    results = {r["id"]: r for r in _results(out)}
    assert len(results) == report.finished == report.problems == 30
    assert report.accepted + report.rejected == 30
    for r in results.values():
        assert r["status"] in ("accepted", "rejected")
        assert (r["status"] == "accepted") == (r["reason"] is None)
        assert all(a["outcome"] for a in r["attempts"])
    assert sum(report.rejection_reasons["final"].values()) == report.rejected
    assert sum(sum(h.values()) for h in report.attempts_histogram.values()) == 30
    n_attempts = sum(len(r["attempts"]) for r in results.values())
    f = report.filters
    assert f["truncation_or_call"]["checked"] == n_attempts
    assert f["format"]["checked"] == f["truncation_or_call"]["passed"]
    assert f["correctness"]["checked"] == f["format"]["passed"]
    assert f["correctness"]["passed"] == report.accepted

    # Retries and errors by cause match what the server injected, call for call (no cause
    # ran out of retries). A timeout can also be real on a loaded machine: at most a few.
    for cause in ("rate_limit", "server_error"):
        assert report.errors_by_cause[cause] == report.retries_by_cause[cause] == counts[cause]
    extra_timeouts = report.errors_by_cause["timeout"] - counts["timeout"]
    assert counts["timeout"] > 0 and 0 <= extra_timeouts <= 3
    assert report.retries_by_cause["timeout"] == report.errors_by_cause["timeout"]
    assert report.usage["calls"] == counts["requests"]
    assert report.usage["prompt_tokens"] > 0 and report.usage["completion_tokens"] > 0

    # Wrong answers are resubmitted with the ground truth; the hint never reaches the data.
    assert 0 < report.hint_resubmissions <= counts["hinted"] <= report.hint_resubmissions + \
        extra_timeouts
    for r in results.values():
        for prev, nxt in zip(r["attempts"], r["attempts"][1:]):
            if prev["outcome"] == "wrong_answer":
                assert nxt["hint"]
    p1 = results["p001"]
    assert [a["outcome"] for a in p1["attempts"]] == ["wrong_answer", "accepted"]
    assert p1["hinted"] and p1["accepted_by"] == "rules"
    assert results["p002"]["accepted_by"] == "judge" and results["p002"]["first_try"]
    assert [a["outcome"] for a in results["p004"]["attempts"]] == \
        ["truncated", "format", "accepted"]
    p5 = results["p005"]
    assert p5["status"] == "rejected" and p5["reason"] == "wrong_answer"
    assert [a["hint"] for a in p5["attempts"]] == [False, True, True]
    p7 = results["p007"]  # a 400 is not retried and not regenerated
    assert p7["reason"] == "call_failed:http_400" and len(p7["attempts"]) == 1
    assert counts["bad_request"] == 1

    # Disambiguation rewrote the multi-question prompts (and kept the others).
    multi = {p.id for p in problems if p.multi}
    assert {pid for pid, r in results.items() if r["rewritten_question"]} <= multi
    assert report.disambiguation.get("rewritten", 0) + report.disambiguation.get("single", 0) \
        + sum(v for k, v in report.disambiguation.items() if k.startswith("failed")) == 30

    # Pools: disjoint, together the accepted set; alignment = the best by quality.
    sft = read_records(out / "sft.json")
    align = read_records(out / "align.parquet")
    accepted = sorted((r for r in results.values() if r["status"] == "accepted"),
                      key=quality_key)
    assert len(sft) == report.sft and len(align) == report.alignment == 1
    assert {r.id for r in sft} | {r.id for r in align} == {r["id"] for r in accepted}
    assert not {r.id for r in sft} & {r.id for r in align}
    assert [r.id for r in align] == [r["id"] for r in accepted[:1]]
    for rec in sft + align:
        assert is_format_valid(rec.response, strict=True)
        assert HINT_TEMPLATE.split("{")[0].strip() not in rec.messages[-1]["content"]
        assert rec.response == results[rec.id]["response"]
        if results[rec.id]["rewritten_question"]:
            assert rec.question == results[rec.id]["rewritten_question"]
        assert len(rec.load_images()) == 1
    a = align[0]
    assert (a.extra["teacher_caption"], a.extra["teacher_cot"]) == split_text(a.response)
    assert a.extra["teacher_response"] == a.response
    assert json.loads((out / "report.json").read_text())["accepted"] == report.accepted


def test_api_key_comes_from_env_and_never_leaks(tmp_path, monkeypatch, caplog):
    secret = "sk-test-DO-NOT-LEAK-4242"
    problems = make_problems(4)
    path = tmp_path / "p.parquet"
    write_problem_file(problems, path)
    monkeypatch.setenv("PRISM_TEST_TEACHER_KEY", secret)
    monkeypatch.setenv("PRISM_TEST_WRONG_KEY", "sk-wrong-key-1234")
    ep = Endpoint("placeholder", "teacher", api_key_env="PRISM_TEST_TEACHER_KEY")
    assert secret not in repr(ep)
    with FaultServer(problems, api_key=secret) as server:
        good = Endpoint(server.base_url, "teacher", "PRISM_TEST_TEACHER_KEY")
        report = curate(path, tmp_path / "ok", teacher=good, judge=good, **FAST)
        assert report.accepted == 4
        with pytest.raises(CurationError) as exc:
            curate(path, tmp_path / "bad", teacher=Endpoint(server.base_url, "teacher",
                                                             "PRISM_TEST_WRONG_KEY"),
                   judge=None, **FAST)
        assert "401" in str(exc.value) and "sk-wrong" not in str(exc.value)
        with pytest.raises(CurationError, match="PRISM_TEST_UNSET"):
            curate(path, tmp_path / "unset", teacher=Endpoint(server.base_url, "t",
                                                              "PRISM_TEST_UNSET"), judge=None)
    # A run-level failure records nothing, so a rerun with the right key does everything.
    assert (tmp_path / "bad" / "results.jsonl").read_text() == ""
    for f in (tmp_path / "ok").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in repr(report) and secret not in caplog.text


def test_jsonl_problems_missing_ground_truth_and_bad_image(tmp_path):
    problems = make_problems(4)
    write_problem_file(problems, tmp_path / "p.parquet")
    recs = read_records(tmp_path / "p.parquet")
    for rec in recs:  # JSONL rows are ShareGPT-shaped: they carry a final assistant turn
        rec.response = "a public demonstration, not sent to the teacher"
    recs[2].ground_truth = None
    recs[3].images[0].data = b"not an image"  # rejected alone; the run goes on
    write_jsonl(recs, tmp_path / "p.jsonl")
    with FaultServer(problems) as server:
        report = curate(tmp_path / "p.jsonl", tmp_path / "out",
                        teacher=Endpoint(server.base_url, "teacher"), judge=None, **FAST)
        counts = dict(server.counts)
    results = {r["id"]: r for r in _results(tmp_path / "out")}
    assert report.accepted == 2 and counts["requests"] == 2
    assert results["p002"]["reason"] == "no_ground_truth" and not results["p002"]["attempts"]
    assert results["p003"]["reason"] == "bad_image" and not results["p003"]["attempts"]
    questions = {p.id: p.question for p in problems}
    out = read_records(tmp_path / "out" / "sft.json") + \
        read_records(tmp_path / "out" / "align.parquet")
    assert sorted(r.id for r in out) == ["p000", "p001"]
    assert all(r.question == questions[r.id] for r in out)


KILL_ARGS = dict(concurrency=2, seed=5, alignment_share=0.1, **FAST)


def _curate_cmd(path: Path, out: Path, url: str) -> list[str]:
    a = KILL_ARGS
    return [sys.executable, "-m", "prism_rl.cli", "data", "curate", "--problems", str(path),
            "--out", str(out), "--teacher-url", url, "--teacher-model", "teacher",
            "--judge-url", url, "--judge-model", "judge", "--concurrency", str(a["concurrency"]),
            "--seed", str(a["seed"]), "--alignment-share", str(a["alignment_share"]),
            "--timeout", str(a["timeout_s"]), "--backoff-base", str(a["backoff_base_s"]),
            "--max-retries", str(a["max_retries"])]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    problems = make_problems(30)
    path = tmp_path / "problems.parquet"
    write_problem_file(problems, path)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rates = FaultRates(**{**RATES.__dict__, "timeout": 0.0})  # timeouts: tested above
    # Faults depend only on (stage, id, attempt, try): both runs see the same outcomes.
    with FaultServer(problems, rates, seed=11, latency_s=0.05) as server:
        teacher, judge = Endpoint(server.base_url, "teacher"), Endpoint(server.base_url, "judge")
        proc = subprocess.Popen(_curate_cmd(path, killed, server.base_url), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        results = killed / "results.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 6:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_before = results.read_bytes().count(b"\n")
        assert 6 <= n_before < 30
        with results.open("ab") as fh:  # what a kill in the middle of a write leaves
            fh.write(b'{"id": "p029", "status": "accepted", "resp')

        # The rerun (same settings, same folder) and an uninterrupted reference run.
        resumed = curate(path, killed, teacher=teacher, judge=judge, **KILL_ARGS)
        curate(path, ref, teacher=teacher, judge=judge, **KILL_ARGS)

    lines = _results(killed)
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) == 30
    assert resumed.run["resumed_skipped"] == n_before
    assert resumed.run["problems_this_run"] == 30 - n_before
    assert resumed.run["dropped_partial_bytes"] > 0

    def outcome(out: Path) -> dict:
        return {r["id"]: (r["status"], r["reason"], r["response"], r["accepted_by"],
                          [a["outcome"] for a in r["attempts"]]) for r in _results(out)}

    assert outcome(killed) == outcome(ref)
    accepted = {k for k, v in outcome(ref).items() if v[0] == "accepted"}
    assert 0 < len(accepted) < 30
    assert (killed / "sft.json").read_bytes() == (ref / "sft.json").read_bytes()
    assert pq.read_table(killed / "align.parquet").to_pylist() == \
        pq.read_table(ref / "align.parquet").to_pylist()


# --------------------------------------------------------------------------- prism serve


def test_against_prism_serve_with_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    import server_process as serve
    problems = make_problems(4)
    path = tmp_path / "p.parquet"
    write_problem_file(problems, path)
    secret = "sk-serve-test-9876"
    monkeypatch.setenv("PRISM_TEST_SERVE_KEY", secret)
    # One torch thread is fastest for the tiny model on 2 cores; a batching window lets the
    # concurrent problems share generate calls.
    proc = serve.start_server_process(tiny_model_dir, None, api_key=secret, extra_args=(
        "--model-name", "tiny", "--threads", "1", "--batch-wait-ms", "50",
        "--max-context", "1024"))
    try:
        serve.wait_until_ready(proc.base_url, 120, proc)
        ep = Endpoint(proc.base_url + "/v1", "tiny", "PRISM_TEST_SERVE_KEY")
        report = curate(path, tmp_path / "out", teacher=ep, judge=ep, disambiguate=True,
                        max_attempts=2, concurrency=4, timeout_s=60, max_tokens=48)
    finally:
        serve.stop_server_process(proc)
    print(f"\nprism serve (tiny): {report.finished} problems in {report.run['wall_s']:.1f} s = "
          f"{report.run['problems_per_min']:.1f} problems/min; {report.rejection_reasons}; "
          f"calls {report.usage['calls']}")
    results = _results(tmp_path / "out")
    assert len(results) == report.finished == 4
    assert report.accepted + report.rejected == 4
    assert sum(report.rejection_reasons["final"].values()) == report.rejected
    assert all(r["reason"] for r in results if r["status"] == "rejected")
    assert report.usage["calls"] >= 4 + sum(len(r["attempts"]) for r in results)
    assert report.usage["completion_tokens"] > 0
    assert report.sft + report.alignment == report.accepted
    for f in (tmp_path / "out").rglob("*"):
        assert secret.encode() not in f.read_bytes()


# --------------------------------------------------------------------------- pairs


def _curated_file(tmp_path: Path) -> Path:
    problems = make_problems(3)
    path = tmp_path / "problems.parquet"
    write_problem_file(problems, path)
    recs = read_records(path)
    for rec, p in zip(recs, problems):
        response = make_response(f"- shapes of {p.id}", "Count them.", p.ground_truth)
        caption, cot = split_text(response)
        rec.extra = {"teacher_caption": caption, "teacher_cot": cot,
                     "teacher_response": response}
    write_verl_parquet(recs, tmp_path / "align.parquet")
    return tmp_path / "align.parquet"


def test_build_pairs_round_trip_and_skips(tmp_path):
    curated = _curated_file(tmp_path)
    good = make_response("- a blue square", "One square.", "1")
    soup = "<caption>a</caption><think>b</think><answer>c</answer>" * 300 + "x"
    samples = [
        {"id": "p000", "sample": 0, "response": good},
        {"id": "p000", "sample": 1, "response": "no tags at all"},
        {"id": "p001", "sample": 0, "response": make_response("", "empty caption ok", "2")},
        {"id": "p002", "sample": 0, "response": soup},
        {"id": "p999", "sample": 0, "response": good},
    ]
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    bad = BadRecords()
    n = build_pairs(curated, samples_path, tmp_path / "pairs.jsonl", bad=bad)  # tag soup included
    assert n == 2 and bad.count == 3
    assert sum("format-invalid" in r for r in bad.reasons) == 2
    assert any("p999" in r for r in bad.reasons)

    pairs = read_pairs(tmp_path / "pairs.jsonl")
    teacher = {r.id: r for r in read_records(curated)}
    assert [p.record.id for p in pairs] == ["p000", "p001"]
    p = pairs[0]
    assert (p.student_caption, p.student_cot) == split_text(good)
    t = teacher["p000"]
    assert (p.teacher_caption, p.teacher_cot) == (t.extra["teacher_caption"],
                                                  t.extra["teacher_cot"])
    assert p.record.question == t.question
    assert p.record.load_images()[0].size == t.load_images()[0].size
    raw = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert raw["image"].startswith("data:image/png;base64,")


def test_build_pairs_rejects_malformed_samples_file(tmp_path):
    curated = _curated_file(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"id": "p000", "response": "x"}\n{"id": "p001"}\n')
    with pytest.raises(DataError, match="line 2, field 'response'"):
        build_pairs(curated, samples, tmp_path / "pairs.jsonl")


def test_prism_data_curate_cli_takes_every_option(tmp_path, monkeypatch, capsys):
    """`prism data curate` is the one entry point: its options reach the pipeline, the summary
    is printed, and a run-level failure is an error line naming the cause, exit 2."""
    from prism_rl.cli import main

    problems = make_problems(3)
    path = tmp_path / "p.parquet"
    write_problem_file(problems, path)
    monkeypatch.setenv("PRISM_TEST_CLI_KEY", "sk-cli-1")
    with FaultServer(problems, api_key="sk-cli-1") as server:
        common = ["data", "curate", "--problems", str(path), "--teacher-url", server.base_url,
                  "--teacher-model", "teacher", "--teacher-key-env", "PRISM_TEST_CLI_KEY", "--max-attempts", "2",
                  "--concurrency", "2", "--timeout", str(TIMEOUT_S), "--max-retries", "2", "--backoff-base", "0.01",
                  "--max-tokens", "64", "--alignment-share", "0.5", "--seed", "4"]
        assert main(common + ["--out", str(tmp_path / "ok"), "--judge-url", server.base_url,
                              "--judge-model", "judge", "--judge-key-env", "PRISM_TEST_CLI_KEY"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["problems"] == 3 and summary["accepted"] == 3 and summary["alignment"] == 2
        assert main(common + ["--out", str(tmp_path / "half"), "--judge-url", server.base_url]) == 2
        assert "--judge-url and --judge-model go together" in capsys.readouterr().err
        monkeypatch.setenv("PRISM_TEST_CLI_KEY", "sk-wrong")
        assert main(common + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prism data curate: error:") and "401" in err and "Traceback" not in err
