"""Property-based fuzz (hypothesis) of the parts that read untrusted text: the format parser,
the caption/reasoning segmenter, the reward, and ``prism serve``'s chat endpoint.

Properties: no exception, each example within a deadline, and the parts agree with each other
(the linear-time format test with the reference regex, the token split with the text split).
The server is a real process on a loopback port; requests are drawn from the JSON schema of
its request model (``ChatRequest.model_json_schema()``, what FastAPI would publish as
``/openapi.json``) widened with out-of-range, wrongly typed and hostile values, and sent over
HTTP: every answer must be below 500 and in OpenAI's error shape, and the server must still
answer afterwards.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from prism_rl.jobs.serve import default_model_name
from prism_rl.jobs.serve_requests import ChatRequest
from prism_rl.models.loading import load_processor
from prism_rl.models.segments import split_ids
from prism_rl.reward import compute_score
from prism_rl.reward.matching import check_answer
from prism_rl.reward.math_verify_pool import run_math_verify

from conftest import png_bytes
from server_process import start_server_process, stop_server_process, wait_until_ready

FAST = settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- the format parser

TAGS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]
PIECES = TAGS + ["<", ">", "/", "</", " ", "\n", "\t", "a", "1", "caption", "think", "answer", "é", "\u2028", "\ud800"]
SOUP = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=40)
PLAIN = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=["Cs"]), max_size=30)


@FAST
@given(SOUP.map("".join))
def test_format_parser_agrees_with_the_reference_regex(text):
    matched = FORMAT_RE.match(text) is not None  # short texts: the regex's backtracking is affordable here
    assert format_matches(text) == matched
    parsed = parse_response(text)
    assert (parsed is not None) == matched == is_format_valid(text)
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)  # the reference of extract_answer
    assert extract_answer(text) == (blocks[-1].strip() if blocks else None)
    split = split_text(text)
    assert (split is not None) == matched
    if split is not None:
        caption, reasoning = split
        assert caption + reasoning == text and caption.endswith("</caption>")
        assert reasoning.lstrip().startswith("<think>")


@FAST
@given(PLAIN, PLAIN, PLAIN)
def test_rendered_responses_parse_back(caption, think, answer):
    parsed = parse_response(make_response(caption, think, answer))
    assert parsed is not None
    assert (parsed.caption, parsed.think, parsed.answer) == (caption.strip(), think.strip(), answer.strip())


@settings(max_examples=20, deadline=1000)
@given(st.lists(st.sampled_from(TAGS + ["x", " "]), min_size=1, max_size=12), st.integers(500, 3000))
def test_tag_soup_is_parsed_in_linear_time(unit, repeats):
    # the reference regexes backtrack on this: the format regex cubically, the answer regex
    # quadratically (75 KB of "<caption><caption><answer>" took 1.6 s in extract_answer)
    text = "".join(unit) * repeats
    parse_response(text)
    split_text(text)
    extract_answer(text)


@FAST
@given(st.lists(st.sampled_from(PIECES + ["<cap", "tion>", "</cap", "</capt", "ion>\n<th", "ink>"]), max_size=40))
def test_caption_token_end_matches_the_text_split(pieces):
    """Tokens are arbitrary text pieces (tags cut anywhere); decode joins them."""
    ids = list(range(len(pieces)))
    decode = lambda t: "".join(pieces[i] for i in t)  # noqa: E731
    k = caption_token_end(ids, decode)
    split = split_text(decode(ids))
    assert (k is None) == (split is None)
    if k is not None:
        assert decode(ids[:k]).startswith(split[0]) and 1 <= k <= len(ids)
        assert k == 1 or not decode(ids[:k - 1]).startswith(split[0])  # the fewest such tokens


# --------------------------------------------------------------------------- the segmenter

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_processor(tiny_model_dir).tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    # a tokenizer takes no lone surrogate (the segmenter itself only ever sees token ids)
    return tokenizer(text.encode("utf-8", "replace").decode("utf-8"), add_special_tokens=False)["input_ids"]


@FAST
@given(data=st.data())
def test_split_ids_agrees_with_the_text_split(tokenizer, data):
    vocab = len(tokenizer)
    text = data.draw(SOUP.map("".join) | st.builds(make_response, PLAIN, PLAIN, PLAIN), label="text")
    ids = data.draw(st.one_of(st.just(_ids(tokenizer, text)),
                              st.lists(st.integers(0, vocab - 1), max_size=60),
                              st.lists(st.integers(0, vocab - 1), max_size=8).map(lambda x: _ids(tokenizer, text) + x)),
                    label="ids")
    seg = split_ids(ids, tokenizer)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert (seg is None) == (split_text(decoded) is None)
    if seg is not None:
        assert seg.caption.tolist() + seg.reasoning.tolist() == ids and seg.caption.numel() >= 1


# --------------------------------------------------------------------------- the reward

MATHY = ["\\frac{", "}", "{", "1", "2", "0", "x", "^", "+", "-", "*", "/", "(", ")", "[", "]", "\\sqrt", "\\pi",
         ".", ",", "%", "=", " ", "A", "(A)", "yes", "no", "\\boxed{", "e", "10^{", "inf", "nan", "∞", "√", "\\left(",
         "\\right)", "\\text{", "cm", "°", "\\infty", "1e308", "9" * 30, "\\\\", "$", "\ud800", "\x00"]
ANSWER = st.lists(st.one_of(st.sampled_from(MATHY), st.text(max_size=2)), max_size=14).map("".join)
TIMEOUT_S = 0.5  # the math-verify fallback's soft deadline; its hard one is 1 s later


@pytest.fixture(scope="module", autouse=True)
def warm_math_verify():
    """Start a math-verify worker now, so that no example pays its start-up."""
    run_math_verify("\\sqrt{4}", "2", 10.0)


@settings(max_examples=60, deadline=2500, suppress_health_check=[HealthCheck.too_slow])
@given(ANSWER, ANSWER)
def test_check_answer_never_raises(answer, truth):
    verdict = check_answer(answer, truth, timeout_s=TIMEOUT_S)
    assert isinstance(verdict.correct, bool) and isinstance(verdict.reason, str) and verdict.reason
    if not truth.strip():
        assert not verdict.correct


@settings(max_examples=60, deadline=2500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(SOUP.map("".join), st.builds(make_response, PLAIN, PLAIN, ANSWER)), ANSWER)
def test_compute_score_is_one_of_its_three_values(response, truth):
    r = compute_score(response, truth, timeout_s=TIMEOUT_S)
    assert (r.score, r.acc, r.format) in {(0.0, 0.0, 0.0), (0.2, 0.0, 1.0), (1.0, 1.0, 1.0)}
    assert (r.answer is None) == (r.format == 0.0)


# --------------------------------------------------------------------------- prism serve

API_KEY = "sk-fuzz-19c0"


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    """Short completions (at most 3 tokens), so that valid requests are cheap to answer."""
    log = tmp_path_factory.mktemp("fuzz-serve") / "server.log"
    proc = start_server_process(tiny_model_dir, api_key=API_KEY, log_path=log, extra_args=[
        "--max-context", 512, "--max-tokens-limit", 3, "--batch-wait-ms", 0, "--threads", 1,
        "--max-body-bytes", 200_000, "--max-image-pixels", 100_000])
    proc.served_name = default_model_name(tiny_model_dir)
    try:
        wait_until_ready(proc.base_url, timeout=180, proc=proc)
        yield proc
    finally:
        stop_server_process(proc)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "<image>", "\ud800", "a\udfffb", "\x00", "<|im_start|>",
                                                        "<|im_end|>", "<|vision_start|>", "é" * 50]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
URLS = st.sampled_from([
    _data_url(png_bytes()), _data_url(png_bytes("blue", size=40)), _data_url(b"not an image"),
    "data:image/png;base64,@@@", "data:,", "data:image/png,plain", "file:///etc/passwd", "file:///dev/zero",
    "http://127.0.0.1:1/x.png", "", "/etc/passwd", _data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
]) | TEXT
GOOD_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS}) | URLS}))
PART = st.one_of(GOOD_PART, GOOD_PART, st.dictionaries(TEXT, JSON, max_size=3), JSON)
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]),
                                      "content": TEXT | st.lists(PART, max_size=3)})
MESSAGE = st.one_of(GOOD_MESSAGE, st.fixed_dictionaries({"role": TEXT | JSON}, optional={"content": JSON}), JSON)
# mostly well-formed conversations, so that the checks past the messages are reached too
MESSAGES = st.one_of(*[st.lists(GOOD_MESSAGE, min_size=1, max_size=3)] * 3, st.lists(MESSAGE, max_size=3))


def from_schema(schema: dict, fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Values for a JSON schema (the subset pydantic writes), widened past its bounds and types:
    the server must refuse those with a 400, never fail on them. ``fields`` overrides properties."""
    if "anyOf" in schema:
        return st.one_of([from_schema(s, fields) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = {k: fields[k] if k in fields else from_schema(v, fields) for k, v in schema.get("properties", {}).items()}
        required = {k: props.pop(k) for k in schema.get("required", [])}
        extra = st.dictionaries(st.sampled_from(["stream", "tools", "user", "logprobs", "x"]), JSON, max_size=2)
        return st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries(required, optional=props), extra)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), fields), max_size=4)
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if kind == "integer":
        near = st.integers(lo if lo is not None else -3, (lo if lo is not None else 0) + 4)
        return near | st.integers(lo, hi) | st.sampled_from([2**80, -(2**70), 2**63, 2**64])
    if kind == "number":
        return st.floats(lo, hi) | st.floats(allow_nan=True, allow_infinity=True)
    if kind == "string":
        return TEXT
    if kind == "null":
        return st.none()
    return JSON


def _assert_answered(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    if r.status_code == 200:
        assert body["object"] == "chat.completion" and body["choices"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


@pytest.fixture(scope="module")
def chat_bodies(fuzz_server):
    schema = ChatRequest.model_json_schema()
    model = st.one_of(*[st.just(fuzz_server.served_name)] * 3, TEXT)  # the served name 3 times in 4
    return from_schema(schema, {"model": model, "messages": MESSAGES})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_serve_answers_every_schema_request_below_500(fuzz_server, chat_bodies, data):
    body = data.draw(chat_bodies, label="body")
    # json.dumps writes NaN and Infinity, which Python's JSON reader (the server's) accepts
    r = httpx.post(f"{fuzz_server.base_url}/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, timeout=60)
    _assert_answered(r)


def _numeric_fields() -> dict[str, dict]:
    """The request model's numeric fields and their schema (the number or integer branch)."""
    out = {}
    for name, prop in ChatRequest.model_json_schema()["properties"].items():
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") in ("integer", "number"):
                out[name] = branch
    return out


def _edges(schema: dict) -> st.SearchStrategy:
    """Values at, just past and far past a numeric field's bounds, and of the wrong kind."""
    lo, hi, integer = schema.get("minimum"), schema.get("maximum"), schema["type"] == "integer"
    step = 1 if integer else 1e-9
    edges = [v for b in (lo, hi) if b is not None for v in (b - step, b, b + step)]
    far = [2**80, -(2**80), 2**63, 2**64, 0, -1] + ([] if integer else [float("nan"), float("inf"), -float("inf")])
    return st.sampled_from(edges + far) | (st.integers() if integer else st.floats(allow_nan=True))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_serve_numeric_fields_at_and_past_their_bounds(fuzz_server, data):
    """An otherwise valid sampling request with one numeric field at or past its schema's bounds
    (a seed of 2**80 used to fail inside generation with a 503)."""
    fields = _numeric_fields()
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    body = {"model": fuzz_server.served_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "temperature": 1.0, name: data.draw(_edges(fields[name]), label="value")}
    r = httpx.post(f"{fuzz_server.base_url}/v1/chat/completions", content=json.dumps(body).encode(), timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    _assert_answered(r)
    if r.status_code == 400:
        assert r.json()["error"]["param"] == name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())),
       st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_serve_answers_raw_bodies_below_500(fuzz_server, raw, content_type):
    r = httpx.post(f"{fuzz_server.base_url}/v1/chat/completions", content=raw, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type})
    _assert_answered(r)


def test_serve_still_answers_after_the_fuzz(fuzz_server):
    r = httpx.post(f"{fuzz_server.base_url}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": fuzz_server.served_name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    assert fuzz_server.poll() is None
