"""Records -> batches: the assistant-only label mask token by token, images, bad records."""

import pytest
from transformers import AutoProcessor

from prism_rl.data.processing import IGNORE_INDEX, chat_messages, collate, encode_all, encode_sft
from prism_rl.data.records import BadRecords, DataError, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.models.loading import special_ids

from conftest import png_bytes

RESP = make_response("- a red circle", "1 circle", "1")


def _rec(i=0, images=None, content="<image>How many red circles?", response=RESP):
    return Record(id=f"r{i}", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": content}],
                  images=[ImageRef(data=png_bytes())] if images is None else images,
                  response=response, source="mem.json", index=i)


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_labels_cover_exactly_the_assistant_turn(proc):
    eos, _ = special_ids(proc)
    enc = encode_sft(proc, _rec(), eos, 4096)
    toks = proc.tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    labelled = [t for t, lab in zip(toks, enc.labels.tolist()) if lab != IGNORE_INDEX]
    unlabelled = [t for t, lab in zip(toks, enc.labels.tolist()) if lab == IGNORE_INDEX]
    # every labelled token is the response (then the closing <|im_end|>), in order
    assert proc.tokenizer.convert_tokens_to_string(labelled[:-1]) == RESP
    assert labelled[-1] == "<|im_end|>"
    # the prompt side: system + user turns and the assistant header, never labelled
    prompt_text = proc.tokenizer.convert_tokens_to_string(unlabelled)
    assert prompt_text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert unlabelled.count("<|image_pad|>") == 9   # 96x96 at patch 16 / merge 2
    # labels are a suffix: once labelled, always labelled
    lab = (enc.labels != IGNORE_INDEX).int().tolist()
    assert lab == sorted(lab)
    assert enc.labels[enc.prompt_len:].tolist() == enc.input_ids[enc.prompt_len:].tolist()
    assert (enc.mm_token_type_ids[enc.prompt_len:] == 0).all()
    assert int(enc.mm_token_type_ids.sum()) == 9


def test_placeholder_position_and_implicit_image(proc):
    msgs = chat_messages(_rec(content="Look: <image> then answer."))
    assert msgs[1]["content"] == [{"type": "text", "text": "Look: "}, {"type": "image"},
                                  {"type": "text", "text": " then answer."}]
    msgs = chat_messages(_rec(content="no placeholder"))
    assert msgs[1]["content"][0] == {"type": "image"}
    with pytest.raises(DataError, match="2 <image> placeholders but 1 images"):
        chat_messages(_rec(content="<image><image>two?"))


def test_collate_pads_both_sides(proc):
    eos, pad = special_ids(proc)
    a, b = encode_sft(proc, _rec(0), eos, 4096), encode_sft(proc, _rec(1, response=RESP * 2), eos, 4096)
    for side in ("left", "right"):
        batch = collate([a, b], pad, side)
        assert batch["input_ids"].shape == (2, len(b))
        assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
        assert batch["pixel_values"].shape[0] == 2 * a.pixel_values.shape[0]
        row = batch["attention_mask"][0]
        assert (row[:len(b) - len(a)] == 0).all() if side == "left" else (row[len(a):] == 0).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("rec,needle", [
    (_rec(3, images=[ImageRef(path="missing.png", base_dir="/nonexistent")]), "mem.json, record 3, field 'images'"),
    (_rec(4, images=[ImageRef(data=b"not a png")]), "mem.json, record 4, field 'images'"),
    (_rec(5, response=RESP * 400), "mem.json, record 5: prompt+response is"),
    (_rec(6, response=None), "mem.json, record 6, field 'response'"),
])
def test_bad_records_named_or_skipped(proc, rec, needle):
    eos, _ = special_ids(proc)
    good = [_rec(0), _rec(1)]
    with pytest.raises(DataError) as e:
        encode_all(proc, good + [rec], eos_id=eos, max_length=1024, with_response=True)
    assert needle in str(e.value)
    bad = BadRecords()
    out = encode_all(proc, good + [rec], eos_id=eos, max_length=1024, with_response=True, skip_bad=True, bad=bad)
    assert len(out) == 2 and bad.count == 1 and f"record {rec.index}" in bad.reasons[0]


def test_freeze_vision_freezes_exactly_the_vision_tower(tiny_model_dir):
    import torch

    from prism_rl.config import ModelConfig
    from prism_rl.models.loading import count_parameters, load_policy, vision_parameters
    model, _ = load_policy(ModelConfig(path=str(tiny_model_dir), freeze_vision=True), torch.device("cpu"))
    frozen = {id(p) for p in vision_parameters(model)}
    assert frozen and all(not p.requires_grad for p in vision_parameters(model))
    assert all(p.requires_grad for p in model.parameters() if id(p) not in frozen)
    total, trainable = count_parameters(model)
    assert total - trainable == sum(p.numel() for p in vision_parameters(model))


def test_data_show_cli_writes_contact_sheet(tmp_path, capsys):
    from prism_rl.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "24", "--seed", "1"]) == 0
    out = tmp_path / "sheet.png"
    assert main(["data", "show", str(tmp_path / "d" / "test.parquet"), "--out", str(out), "-k", "3"]) == 0
    from PIL import Image
    assert Image.open(out).size[0] > 96
    assert "contact sheet" in capsys.readouterr().out


# ---- data.overlong: an SFT example over data.max_length


LONG = make_response("- a red circle " * 20, "count them " * 30, "1")


def _limit(proc, extra_response_tokens: int) -> tuple[int, int]:
    """(prompt tokens of _rec(), a max_length leaving ``extra_response_tokens`` for the response)."""
    from prism_rl.data.processing import encode_prompt
    p = encode_prompt(proc, _rec()).prompt_len
    return p, p + extra_response_tokens


def test_overlong_truncate_cuts_only_the_response_and_drops_its_eos(proc):
    eos, _ = special_ids(proc)
    p, limit = _limit(proc, 10)
    full = encode_sft(proc, _rec(response=LONG), eos, 100_000)
    enc = encode_sft(proc, _rec(response=LONG), eos, limit, overlong="truncate")
    assert len(enc) == limit and enc.prompt_len == p
    assert enc.truncated == len(full) - limit > 0
    # the prompt (with all 9 image tokens) is whole; the response is the full one's first 10 tokens
    assert enc.input_ids.tolist() == full.input_ids[:limit].tolist()
    assert int(enc.mm_token_type_ids.sum()) == 9
    assert enc.labels[p:].tolist() == full.input_ids[p:limit].tolist()
    assert (enc.labels[:p] == IGNORE_INDEX).all()
    assert eos not in enc.input_ids[p:].tolist()      # a cut answer must not teach stopping there
    # an example that fits is untouched in every mode
    for mode in ("truncate", "skip", "error"):
        short = encode_sft(proc, _rec(), eos, 4096, overlong=mode)
        assert short.truncated == 0 and short.input_ids[-1].item() == eos


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_overlong_skip_and_error_raise_naming_the_record(proc, mode):
    from prism_rl.data.processing import OverlongError
    eos, _ = special_ids(proc)
    _, limit = _limit(proc, 10)
    with pytest.raises(OverlongError, match=rf"mem.json, record 7: prompt\+response is \d+ tokens, over "
                                             rf"data.max_length={limit} \(data.overlong={mode}\)"):
        encode_sft(proc, _rec(7, response=LONG), eos, limit, overlong=mode)


def test_overlong_prompt_alone_is_never_truncated(proc):
    from prism_rl.data.processing import OverlongError
    eos, _ = special_ids(proc)
    p, _ = _limit(proc, 0)
    for limit in (p - 1, p):     # no room for one response token
        with pytest.raises(OverlongError, match=f"mem.json, record 2: the prompt alone is {p} tokens"):
            encode_sft(proc, _rec(2), eos, limit, overlong="truncate")
    with pytest.raises(ValueError, match="overlong must be one of"):
        encode_sft(proc, _rec(), eos, 4096, overlong="cut")
