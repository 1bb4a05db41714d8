"""data.overlong in an SFT run: each mode on a file with one over-long example, and the counts
the run writes (nothing is truncated or dropped silently)."""

import json

import pytest
from transformers import AutoProcessor

from prism_rl.config import SFTConfig, load_config
from prism_rl.data.layouts import write_sharegpt_json
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.models.loading import special_ids
from prism_rl.trainers.sft import load_examples, overlong_report, train_sft

from conftest import png_bytes

SHORT = make_response("- a red circle", "1 circle", "1")
LONG = make_response("- a red circle " * 20, "count them " * 30, "1")


def _rec(i, response):
    return Record(id=f"r{i}", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": "<image>How many red circles?"}],
                  images=[ImageRef(data=png_bytes())], response=response, source="mem.json", index=i)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(processor, eos, sft.json with records 0 and 2 short and 1 long, prompt tokens, a limit between)."""
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    eos, _ = special_ids(proc)
    path = tmp_path_factory.mktemp("sft") / "sft.json"
    write_sharegpt_json([_rec(0, SHORT), _rec(1, LONG), _rec(2, SHORT)], path)
    prompt = encode_prompt(proc, _rec(0, SHORT)).prompt_len
    return proc, eos, path, prompt, prompt + 40   # SHORT fits in 40 response tokens, LONG does not


def _cfg(path, limit, *overrides):
    return load_config(SFTConfig, None, [f"data.train={path}", f"data.max_length={limit}", *overrides])


def test_default_is_spec_length_and_truncate():
    d = SFTConfig().data
    assert (d.max_length, d.overlong) == (8192, "truncate")


def test_truncate_keeps_every_example_and_counts_the_cut(setup):
    proc, eos, path, _, limit = setup
    cfg = _cfg(path, limit, "data.overlong=truncate")
    skipped = BadRecords()
    examples = load_examples(cfg, proc, eos, BadRecords(), skipped)
    assert [len(e) <= limit for e in examples] == [True] * 3
    assert [e.truncated > 0 for e in examples] == [False, True, False]
    report = overlong_report(cfg, examples, skipped)
    assert report["truncated"] == 1 and report["skipped"] == 0
    assert report["tokens_cut"] == examples[1].truncated and report["records"] == [f"{path}, record 1"]


def test_skip_drops_and_counts_the_long_example(setup):
    proc, eos, path, _, limit = setup
    cfg = _cfg(path, limit, "data.overlong=skip")
    skipped, bad = BadRecords(), BadRecords()
    examples = load_examples(cfg, proc, eos, bad, skipped)
    assert [e.record.index for e in examples] == [0, 2] and bad.count == 0
    assert skipped.count == 1 and skipped.reasons[0].startswith(f"{path}, record 1: prompt+response is")
    assert overlong_report(cfg, examples, skipped)["skipped"] == 1


def test_error_names_the_record_unless_skip_bad(setup):
    proc, eos, path, _, limit = setup
    with pytest.raises(DataError, match=rf"{path}, record 1: prompt\+response is \d+ tokens, over "
                                        rf"data.max_length={limit} \(data.overlong=error\)"):
        load_examples(_cfg(path, limit, "data.overlong=error"), proc, eos, BadRecords(), BadRecords())
    bad = BadRecords()
    examples = load_examples(_cfg(path, limit, "data.overlong=error", "data.skip_bad=true"), proc, eos, bad, BadRecords())
    assert len(examples) == 2 and bad.count == 1 and "record 1" in bad.reasons[0]


def test_prompt_over_the_limit_is_an_error_or_a_skip(setup):
    proc, eos, path, prompt, _ = setup
    with pytest.raises(DataError, match=f"{path}, record 0: the prompt alone is {prompt} tokens"):
        load_examples(_cfg(path, prompt, "data.overlong=truncate"), proc, eos, BadRecords(), BadRecords())
    skipped = BadRecords()
    with pytest.raises(ValueError, match="no usable training records .* 3 over data.max_length skipped"):
        load_examples(_cfg(path, prompt, "data.overlong=skip"), proc, eos, BadRecords(), skipped)
    assert skipped.count == 3


def test_run_writes_the_counts_to_start_event_and_summary(setup, tiny_model_dir, tmp_path):
    _, _, path, _, limit = setup
    cfg = _cfg(path, limit, f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "train.max_steps=1",
               "train.batch_size=3")
    train_sft(cfg)
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for where in (start, summary):
        assert where["overlong"]["mode"] == "truncate" and where["overlong"]["truncated"] == 1
        assert where["overlong"]["tokens_cut"] > 0 and where["overlong"]["max_length"] == limit
