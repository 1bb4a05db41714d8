"""``prism serve``: a real server process on a loopback port, driven by the official openai client.

Reference values come from the same checkpoint loaded in the test process: prompt token
counts from ``encode_prompt`` on the equivalent ``Record``, completions (greedy, or seeded
sampling) from ``HFEngine.generate``. One server process serves the whole module.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from prism_rl.config import ModelConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.jobs.serve import (
    GenKey,
    Job,
    create_app,
    default_model_name,
    first_stop,
    group_jobs,
    tokens_reaching,
)
from prism_rl.models.loading import load_policy
from prism_rl.rollout.base import SamplingParams
from prism_rl.rollout.hf import HFEngine

from conftest import png_bytes
from server_process import start_server_process, stop_server_process, wait_until_ready

API_KEY = "sk-prism-test-4c1d9e"
CONTEXT, TOKENS_LIMIT = 1024, 256
QUESTION = "How many red circles are there?"


@pytest.fixture(scope="module")
def file_dir(tmp_path_factory):
    """The one folder the server reads file:// URLs from (--allow-file-urls)."""
    return tmp_path_factory.mktemp("served-files")


@pytest.fixture(scope="module", autouse=True)
def server_process(tiny_model_dir, tmp_path_factory, file_dir):
    """Started before the module's first test: it boots (imports take most of its start-up)
    while the in-process tests run and the reference model loads."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # a long batching window makes the concurrency test's batching dependable; one torch
    # thread is fastest for the tiny model on a 2-core machine and matches `local`'s numerics
    proc = start_server_process(tiny_model_dir, api_key=API_KEY, log_path=log, extra_args=[
        "--max-context", CONTEXT, "--max-tokens-limit", TOKENS_LIMIT, "--batch-wait-ms", 100, "--threads", 1,
        "--allow-file-urls", file_dir])
    yield proc
    stop_server_process(proc)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(server_process):
    """One torch thread here too, as in the server: greedy and seeded samples then match the
    server's bit for bit (and the tiny model runs fastest so on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(server_process, local):
    wait_until_ready(server_process.base_url, timeout=120, proc=server_process)
    return server_process


@pytest.fixture(scope="module")
def client(server):
    # no retries: the client would otherwise silently resend requests that got a 503
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(tiny_model_dir):
    return Path(tiny_model_dir).name


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same checkpoint in this process, for reference encodings and generations."""
    model, processor = load_policy(ModelConfig(path=str(tiny_model_dir)), trainable=False)
    return HFEngine(model, processor)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _image_msg(url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def _reference(local, messages, images=(), **sampling):
    """(prompt length, rollouts) for the equivalent Record, generated in this process."""
    enc = encode_prompt(local.processor, Record(id="ref", messages=messages, images=list(images)))
    seed = sampling.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return enc.prompt_len, local.generate([enc], SamplingParams(**sampling))


def _good_request(client, name):
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert len(r.choices) == 1


# --------------------------------------------------------------------------- in-process

def test_a_failing_batch_fails_only_its_requests(tiny_model_dir, monkeypatch):
    app = create_app(tiny_model_dir, model_name="m")
    engine = app.state.server.engine
    real, calls = engine.generate, []

    def flaky(prompts, params, group_offset=0):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("simulated CUDA out of memory")
        return real(prompts, params, group_offset)

    monkeypatch.setattr(engine, "generate", flaky)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", json=body)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "generation_failed"
        assert tc.post("/v1/chat/completions", json=body).status_code == 200
        assert tc.get("/v1/stats").json()["failed_calls"] == 1


def test_default_model_name_says_which_run(tmp_path, tiny_model_dir):
    assert default_model_name(tmp_path / "runs" / "rl" / "final") == "rl/final"
    assert default_model_name(tmp_path / "runs" / "align" / "checkpoint-40" / "policy") == "align/checkpoint-40/policy"
    assert default_model_name(tmp_path / "Qwen3-VL-4B-Instruct") == "Qwen3-VL-4B-Instruct"
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "final").symlink_to(tiny_model_dir)  # the path given names it, not the link's target
    with TestClient(create_app(tmp_path / "sft" / "final")) as tc:
        assert [m["id"] for m in tc.get("/v1/models").json()["data"]] == ["sft/final"]


def test_group_jobs_by_settings_rows_and_seed():
    greedy, sampled = GenKey(0.0, 1.0, 8, 1), GenKey(1.0, 1.0, 8, 4)
    jobs = [Job(None, k, 1, (), None) for k in
            [greedy, sampled, greedy, sampled, sampled, GenKey(1.0, 1.0, 8, 4, seed=1), GenKey(1.0, 1.0, 8, 4, seed=1)]]
    groups = group_jobs(jobs, max_rows=8)
    keys = [[j.key for j in g] for g in groups]
    # greedy together; n=4 sampled split at 8 rows; equal seeded keys still each alone
    assert keys == [[greedy, greedy], [sampled, sampled], [sampled], [jobs[5].key], [jobs[6].key]]


def test_stop_helpers():
    assert first_stop("abcXYdefXY", ("XY", "def")) == (3, 5)
    assert first_stop("abc", ("z",)) is None
    # tokens of two characters each: the 3rd character ends inside the 2nd token
    assert tokens_reaching([7, 8, 9, 10], 3, lambda ids: "ab" * len(ids)) == 2
    assert tokens_reaching([7, 8, 9, 10], 8, lambda ids: "ab" * len(ids)) == 4


# --------------------------------------------------------------------------- completions

def test_models_lists_the_checkpoint(client, name):
    models = client.models.list().data
    assert [m.id for m in models] == [name]
    assert models[0].object == "model" and models[0].owned_by == "prism-rl"


def test_multi_turn_text_completion_matches_the_engine(client, local, name):
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION},
               {"role": "assistant", "content": "<answer>1</answer>"}, {"role": "user", "content": "And blue?"}]
    r = client.chat.completions.create(model=name, messages=history, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == name
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_len, ro = _reference(local, history, n=1, max_new_tokens=12, temperature=0.0)
    # the earlier assistant turn is part of the prompt, encoded exactly as in training
    assert r.usage.prompt_tokens == prompt_len
    assert r.choices[0].message.content == ro.texts[0]
    assert r.choices[0].finish_reason == ro.finish_reasons[0]
    assert r.usage.completion_tokens == int(ro.response_lengths.sum())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_by_data_url_and_by_file_url(client, local, name, file_dir):
    png = png_bytes("blue", shape="square")
    path = file_dir / "square.png"
    path.write_bytes(png)
    by_data = client.chat.completions.create(model=name, messages=[_image_msg(_data_url(png))],
                                             temperature=0, max_tokens=8)
    by_file = client.chat.completions.create(model=name, messages=[_image_msg(path.as_uri())],
                                             temperature=0, max_tokens=8)
    prompt_len, ro = _reference(local, [{"role": "user", "content": "<image>" + QUESTION}],
                                [ImageRef(data=png)], n=1, max_new_tokens=8, temperature=0.0)
    text_only = encode_prompt(local.processor, Record(id="t", messages=[{"role": "user", "content": QUESTION}]))
    assert prompt_len > text_only.prompt_len  # the image's visual tokens are counted
    for r in (by_data, by_file):
        assert r.usage.prompt_tokens == prompt_len
        assert r.choices[0].message.content == ro.texts[0]
        assert r.usage.completion_tokens == int(ro.response_lengths.sum())
        assert r.choices[0].finish_reason in ("stop", "length")


def test_file_urls_read_only_regular_files_inside_the_allowed_folder(client, name, file_dir, tmp_path):
    """Outside the folder, through a link out of it, climbing out with '..', missing, a folder,
    a FIFO: one answer for all, so the port cannot tell which files exist."""
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    (file_dir / "link-out.png").symlink_to(outside)
    (file_dir / "a-folder.png").mkdir()
    os.mkfifo(file_dir / "fifo.png")
    urls = [outside.as_uri(), (file_dir / "link-out.png").as_uri(), f"file://{file_dir}/../{tmp_path.name}/outside.png",
            (file_dir / "missing.png").as_uri(), (file_dir / "a-folder.png").as_uri(), (file_dir / "fifo.png").as_uri(),
            "file:///etc/passwd", "file://remote-host/etc/passwd", "file:relative.png"]
    bodies = []
    for url in urls:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=name, messages=[_image_msg(url)], max_tokens=1)
        bodies.append(info.value.body)
    assert all(b == bodies[0] for b in bodies), bodies
    assert bodies[0]["code"] == "invalid_image_url" and "this file:// URL cannot be read" in bodies[0]["message"]
    (file_dir / "ok.png").write_bytes(png_bytes("green"))
    r = client.chat.completions.create(model=name, messages=[_image_msg(f"file://{file_dir}/./ok.png")], max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_n_seeded_samples_and_usage_sum(client, local, name):
    msgs = [{"role": "user", "content": QUESTION}]
    kw = dict(model=name, messages=msgs, n=3, temperature=1.0, max_tokens=10, seed=123)
    r1, r2 = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in r1.choices] == [0, 1, 2]
    assert [c.message.content for c in r1.choices] == [c.message.content for c in r2.choices]
    _, ro = _reference(local, msgs, n=3, max_new_tokens=10, temperature=1.0, seed=123)
    assert [c.message.content for c in r1.choices] == ro.texts
    # usage: completion tokens are the tokens of every choice, summed
    assert r1.usage.completion_tokens == int(ro.response_lengths.sum())
    assert all(c.finish_reason in ("stop", "length") for c in r1.choices)


def test_greedy_is_deterministic_and_max_tokens_gives_length(client, name):
    kw = dict(model=name, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=5, n=2)
    r1, r2 = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in r1.choices]
    assert texts == [c.message.content for c in r2.choices] and texts[0] == texts[1]
    assert [c.finish_reason for c in r1.choices] == ["length", "length"]
    assert r1.usage.completion_tokens == 2 * 5
    # max_completion_tokens is the newer name of the same limit
    r3 = client.chat.completions.create(model=name, messages=kw["messages"], temperature=0, max_completion_tokens=3)
    assert r3.usage.completion_tokens == 3 and r3.choices[0].finish_reason == "length"


def test_stop_cuts_the_text(client, name):
    kw = dict(model=name, messages=[{"role": "user", "content": QUESTION}], temperature=1.0, max_tokens=24, seed=7)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert len(text) > 10
    stop = text[6:9]
    cut = client.chat.completions.create(**kw, stop=["never-generated-xyz", stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert 0 < cut.usage.completion_tokens < full.usage.completion_tokens
    single = client.chat.completions.create(**kw, stop=stop)  # a plain string works too
    assert single.choices[0].message.content == cut.choices[0].message.content


def test_concurrent_requests_are_batched(client, server, name):
    stats = lambda: httpx.get(f"{server.base_url}/v1/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    before = stats()
    n_threads = 8
    barrier, results, errors = threading.Barrier(n_threads), [None] * n_threads, []

    def ask(i):
        msgs = ([_image_msg(_data_url(png_bytes("red" if i % 4 else "green")))] if i % 2 else
                [{"role": "user", "content": f"{QUESTION} {i}"}])
        barrier.wait()
        try:
            results[i] = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=16)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(r is not None and r.choices[0].finish_reason in ("stop", "length") for r in results)
    after = stats()
    calls = after["generate_calls"] - before["generate_calls"]
    assert after["requests"] - before["requests"] == n_threads
    assert calls < n_threads, after
    assert max(after["requests_per_call"][-calls:]) > 1


# --------------------------------------------------------------------------- errors

def _bad_image_file(tmp_dir: Path) -> str:
    p = tmp_dir / "not-an-image.png"
    p.write_bytes(b"this is text, not a PNG")
    return p.as_uri()


BAD_REQUESTS = [
    # (kwargs for chat.completions.create, error class, code, words in the message)
    (dict(model="gpt-nothing"), openai.NotFoundError, "model_not_found", "does not exist"),
    (dict(messages=[]), openai.BadRequestError, None, "at least one message"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, None, "role"),
    (dict(messages=[{"role": "user"}]), openai.BadRequestError, None, "content"),
    (dict(messages=[{"role": "user", "content": 42}]), openai.BadRequestError, None, "string or a list"),
    (dict(messages=["hello"]), openai.BadRequestError, None, "object"),
    (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
     openai.BadRequestError, None, "'text' or 'image_url'"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     openai.BadRequestError, None, "must be a string"),
    (dict(messages=[{"role": "user", "content": "look: <image>"}]), openai.BadRequestError, None, "reserved"),
    (dict(messages=[_image_msg("https://example.com/cat.png")]), openai.BadRequestError, "invalid_image_url",
     "only base64 data"),
    (dict(messages=[_image_msg("data:image/png;base64,@@not-base64@@")]), openai.BadRequestError,
     "invalid_image_url", "base64"),
    (dict(messages=[_image_msg("data:image/png;base64," + base64.b64encode(b"no image here").decode())]),
     openai.BadRequestError, "invalid_image", "not a decodable image"),
    (dict(messages=[_image_msg("file:///definitely/not/here.png")]), openai.BadRequestError,
     "invalid_image_url", "this file:// URL cannot be read"),
    ("BAD_FILE", openai.BadRequestError, "invalid_image", "not a decodable image"),
    (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
     openai.BadRequestError, None, "only allowed in user messages"),
    (dict(n=0), openai.BadRequestError, None, "'n'"),
    (dict(n=129), openai.BadRequestError, None, "'n'"),
    (dict(temperature=-0.5), openai.BadRequestError, None, "'temperature'"),
    (dict(temperature=2.5), openai.BadRequestError, None, "'temperature'"),
    (dict(top_p=1.5), openai.BadRequestError, None, "'top_p'"),
    (dict(max_tokens=0), openai.BadRequestError, None, "'max_tokens'"),
    (dict(max_tokens=TOKENS_LIMIT + 1), openai.BadRequestError, "context_length_exceeded", "limit"),
    # ~900 prompt tokens + 200 > 1024
    (dict(messages=[{"role": "user", "content": "circle " * 900}], max_tokens=200),
     openai.BadRequestError, "context_length_exceeded", "maximum context length"),
    # no max_tokens: the prompt alone fills the context
    (dict(messages=[{"role": "user", "content": "circle " * 1100}], max_tokens=None),
     openai.BadRequestError, "context_length_exceeded", "maximum context length"),
    (dict(stream=True), openai.BadRequestError, "unsupported_parameter", "stream"),
]


@pytest.mark.parametrize("kwargs,error,code,words", BAD_REQUESTS,
                         ids=[f"{i}-{e[2] or e[3][:20]}" for i, e in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(client, name, file_dir, kwargs, error, code, words):
    if kwargs == "BAD_FILE":
        kwargs = dict(messages=[_image_msg(_bad_image_file(file_dir))])
    full = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**full)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["code"] == code
    assert words in body["message"], body
    _good_request(client, name)  # the server keeps serving


def test_raw_malformed_bodies(server, client, name):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.base_url}/v1/chat/completions"
    cases = [
        (dict(content=b"{not json", headers={**auth, "Content-Type": "application/json"}), 400, None),
        (dict(json={"model": name}), 400, "messages"),               # missing messages
        (dict(json=["a", "list"]), 400, None),                        # body is not an object
        (dict(json={"model": name, "messages": "hi"}), 400, "messages"),
        (dict(json={"model": name, "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 17}), 400, "stop"),
    ]
    for kw, status, param in cases:
        r = httpx.post(url, **({"headers": auth} | kw))
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, err
    r = httpx.get(f"{server.base_url}/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and "Invalid URL" in r.json()["error"]["message"]
    _good_request(client, name)


def test_api_key_is_required_and_never_logged(server, name):
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # no header at all; the check comes before body parsing, so even a bad body gets a 401
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # readiness needs no key
    assert API_KEY not in Path(server.log_path).read_text(errors="replace")


def test_an_unknown_model_is_answered_with_the_served_name(client, name):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="final", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert f"The model 'final' does not exist; this server serves one model, '{name}'" in err.value.message
