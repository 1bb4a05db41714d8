"""The response format: parse, validate (reference + strict), extract, split (text and tokens)."""

import random

import pytest

from prism_rl.format import (
    FORMAT_RE,
    caption_token_end,
    extract_answer,
    format_matches,
    is_format_valid,
    make_response,
    parse_response,
    split_text,
)

GOOD = "<caption>\n- a red circle\n</caption>\n<think>\n1 + 1 = 2\n</think>\n<answer>\n2\n</answer>"


@pytest.mark.parametrize("text,valid,strict", [
    (GOOD, True, True),
    ("  \n" + GOOD + "\n\n", True, True),                                   # outer white space allowed
    ("<caption></caption><think>x</think><answer>2</answer>", True, False),  # empty caption: strict fails
    ("<caption>c</caption><think> </think><answer>2</answer>", True, False),  # blank think
    ("<caption>c</caption><think>t</think><answer></answer>", True, False),
    ("Sure! " + GOOD, False, False),                                          # text before
    (GOOD + " Hope this helps.", False, False),                               # text after
    ("<think>t</think><caption>c</caption><answer>2</answer>", False, False),  # wrong order
    ("<caption>c</caption><think>t</think><answer>2", False, False),          # unclosed answer
    ("<caption>c</caption><answer>2</answer>", False, False),                 # missing think
    ("<caption>c</caption>between<think>t</think><answer>2</answer>", False, False),  # junk between
    ("", False, False),
    ("<caption>a</caption><think>b</think><answer>1</answer><answer>2</answer>", True, True),
])
def test_validity(text, valid, strict):
    assert is_format_valid(text) is valid
    assert is_format_valid(text, strict=True) is strict


def test_parse_parts_are_stripped():
    p = parse_response(GOOD)
    assert (p.caption, p.think, p.answer) == ("- a red circle", "1 + 1 = 2", "2")
    assert parse_response("no tags") is None


def test_nested_looking_tags_are_non_greedy():
    # the caption mentions a closing think tag in prose; regex stops at the first </caption>
    text = "<caption>uses </think> text</caption><think>t</think><answer>7</answer>"
    assert parse_response(text).caption == "uses </think> text"


@pytest.mark.parametrize("text,ans", [
    (GOOD, "2"),
    ("garbage <answer> 42 </answer> more", "42"),
    ("<answer>1</answer> then <answer>3</answer>", "3"),   # last closed block wins
    ("<answer>unclosed", None),
    ("", None),
])
def test_extract_answer(text, ans):
    assert extract_answer(text) == ans


def test_make_response_roundtrip():
    r = make_response(" - cap ", "think", "B")
    assert parse_response(r).caption == "- cap" and parse_response(r).answer == "B"
    assert is_format_valid(r, strict=True)


def test_split_text():
    cap, rest = split_text(GOOD)
    assert cap.endswith("</caption>") and cap + rest == GOOD
    assert rest.lstrip().startswith("<think>")
    assert split_text("<caption>x</caption>") is None


def _char_tokens(text, size):
    """A toy tokenizer: fixed-size character chunks (boundaries fall anywhere)."""
    ids = [text[i:i + size] for i in range(0, len(text), size)]
    return ids, lambda toks: "".join(toks)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_caption_token_end_for_any_boundaries(size):
    toks, decode = _char_tokens(GOOD, size)
    k = caption_token_end(toks, decode)
    cap_end = GOOD.index("</caption>") + len("</caption>")
    assert "</caption>" in decode(toks[:k]) and "</caption>" not in decode(toks[:k - 1])
    assert len(decode(toks[:k])) >= cap_end > len(decode(toks[:k - 1]))


def test_caption_token_end_invalid_and_real_tokenizer(tiny_model_dir):
    from transformers import AutoProcessor
    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    ids = tok(GOOD, add_special_tokens=False)["input_ids"]
    k = caption_token_end(ids, tok.decode)
    assert tok.convert_ids_to_tokens(ids[k - 1]) == "</caption>"  # format tags are single tokens
    assert caption_token_end(ids[:-3], tok.decode) is None        # truncated -> invalid


def test_tag_soup_is_linear_time():
    """A degenerate rollout repeating all six tags must not stall the regex (it took ~10 s)."""
    soup = "<caption></caption><think></think><answer></answer>" * 400 + "x"
    assert not is_format_valid(soup) and parse_response(soup) is None and split_text(soup) is None
    assert is_format_valid(soup[:-1])      # the same soup without the trailing junk is valid


def test_format_matches_agrees_with_reference_regex():
    """The linear-time pre-check accepts exactly the strings the reference regex matches."""
    tags = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]
    pieces = [*tags, " ", "\n", "x", "\u00a0"]
    rng = random.Random(0)
    valid = 0
    for _ in range(20000):
        parts = ["<caption>", "x", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]
        for _ in range(rng.randint(0, 4)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(pieces))
        if rng.random() < 0.3:
            del parts[rng.randrange(len(parts))]
        s = "".join(parts)
        assert format_matches(s) == (FORMAT_RE.match(s) is not None), repr(s)
        valid += is_format_valid(s)
    assert valid > 1000
