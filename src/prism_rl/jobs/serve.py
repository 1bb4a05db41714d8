"""``prism serve``: an OpenAI-compatible chat-completions server for a local checkpoint.

``create_app(model_dir)`` loads the checkpoint with the training loaders and returns a FastAPI
app with ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /v1/stats`` (batching
counters) and ``GET /health`` (readiness; the only route that needs no API key).
``run_server`` serves it with uvicorn on 127.0.0.1 by default.

Requests are converted into the training ``Record`` type (``<image>`` placeholders where the
image parts were) and encoded with ``encode_prompt``, so the chat template and processor path
are exactly the ones the model was trained with.

Batching: one background worker owns the model. Each request is encoded in a thread, then
put on an asyncio queue. The worker takes the first waiting request, waits up to
``batch_wait_ms`` for more (up to ``max_batch``), groups them by sampling settings and runs
one ``HFEngine.generate`` per group on its own generation thread, so the event loop keeps
accepting requests (which form the next batch) while the model works.

Every error is answered in OpenAI's shape ``{"error": {message, type, param, code}}`` with a
4xx status (503 when generation itself fails); the server keeps serving.

``start_server_process`` / ``wait_until_ready`` / ``stop_server_process`` run the server as a
separate process (``python -m prism_rl.jobs.serve``) for tests and tools.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ModelConfig
from ..data.images import image_ref
from ..data.processing import Encoded, encode_prompt
from ..data.records import IMAGE_PLACEHOLDER, BadField, DataError, ImageRef, Record
from ..models.loading import load_policy
from ..rollout.base import SamplingParams
from ..rollout.hf import HFEngine

log = logging.getLogger(__name__)

API_KEY_ENV = "PRISM_API_KEY"
MAX_N = 128                      # OpenAI's own limit on choices per request
MAX_STOP = 16
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters we cannot honour: silently ignoring them would return something the caller
# did not ask for, so they are refused.
UNSUPPORTED = ("stream", "logprobs", "top_logprobs", "tools", "functions")


# --------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse(status_code=self.status, content={"error": body})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI/pydantic body errors -> one 400 naming the parameter(s)."""
    parts, params = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"The request body is not valid JSON: {err.get('msg')}")
            continue
        param = ".".join(loc) or None
        params.append(param)
        parts.append(f"Invalid value for '{param}': {err.get('msg')}" if param else str(err.get("msg")))
    return bad_request("; ".join(parts) or "Invalid request.", params[0] if params else None)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_req: Request, exc: APIError):
        return exc.response()

    async def validation(_req: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    async def http_error(req: Request, exc: StarletteHTTPException):
        # unknown routes (404) and wrong methods (405) in OpenAI's shape too
        msg = f"Invalid URL ({req.method} {req.url.path})" if exc.status_code == 404 else str(exc.detail)
        code = "unknown_url" if exc.status_code == 404 else None
        return APIError(exc.status_code, msg, code=code).response()

    async def unexpected(_req: Request, exc: Exception):
        # a bug must not surface as a bare 500 page: log it, answer in the API's shape
        log.error("unexpected error", exc_info=exc)
        return APIError(503, f"Internal error: {type(exc).__name__}", type="server_error",
                        code="internal_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# --------------------------------------------------------------------------- requests

class ChatRequest(BaseModel):
    """The chat-completions parameters we use; other fields (``user``, ``metadata``...) are
    accepted and ignored, as OpenAI clients send them freely."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]                     # checked part by part in ``messages_to_record``
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None


def _check_supported(req: ChatRequest) -> None:
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name):
            raise bad_request(f"'{name}' is not supported by this server.", name, "unsupported_parameter")


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed.", "stop")
    return tuple(s for s in stops if s)  # an empty stop string would cut every response to ""


# --------------------------------------------------------------------------- messages -> Record

def _checked_text(text: str, param: str) -> str:
    # the training format marks images with this literal; letting it through would misplace
    # (or miscount) the images
    if IMAGE_PLACEHOLDER in text:
        raise bad_request(f"'{param}' contains the reserved string '{IMAGE_PLACEHOLDER}'; send images "
                          "as image_url content parts.", param)
    return text


def image_bytes(image_url: Any, param: str, allow_file_urls: bool = True) -> bytes:
    """Encoded image bytes from an ``image_url`` part (a data: or file:// URL), checked to
    decode; raises a 400 ``APIError`` otherwise."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"{param}.url" if isinstance(image_url, dict) else param
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{param}' must be a data: or file:// URL string.", param, "invalid_image_url")
    try:
        # base_dirs=None: a client may not name server files by plain path
        data = image_ref(url, param, allow_file_urls=allow_file_urls).data
    except BadField as e:
        raise bad_request(f"'{param}': {e.why}.", param, "invalid_image_url") from e
    try:
        ImageRef(data=data).load()  # decode now, so a bad image is the caller's 400 naming the part
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise bad_request(f"'{param}' is not a decodable image: {e}.", param, "invalid_image") from e
    return data


def _content_text(content: Any, role: str, where: str, images: list[ImageRef], allow_file_urls: bool) -> str:
    """One message's content as text with ``<image>`` where its image parts were."""
    if isinstance(content, str):
        return _checked_text(content, f"{where}.content")
    if not isinstance(content, list):
        raise bad_request(f"'{where}.content' must be a string or a list of content parts.", f"{where}.content")
    pieces = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{pwhere}.text' must be a string.", f"{pwhere}.text")
            pieces.append(_checked_text(part["text"], f"{pwhere}.text"))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"'{pwhere}': images are only allowed in user messages.", pwhere)
            data = image_bytes(part.get("image_url"), f"{pwhere}.image_url", allow_file_urls)
            images.append(ImageRef(data=data))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise bad_request(f"Invalid content part '{pwhere}': type must be 'text' or 'image_url', "
                              f"got {kind!r}.", f"{pwhere}.type")
    # parts are concatenated as Qwen's own template does with list content
    return "".join(pieces)


def messages_to_record(messages: list[Any], allow_file_urls: bool = True) -> Record:
    """OpenAI chat messages -> a prompt ``Record`` (earlier assistant turns included)."""
    if not messages:
        raise bad_request("'messages' must contain at least one message.", "messages")
    turns: list[dict[str, str]] = []
    images: list[ImageRef] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"'{where}' must be an object with 'role' and 'content'.", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected 'system', 'user' "
                              "or 'assistant'.", f"{where}.role")
        if "content" not in msg:
            raise bad_request(f"'{where}.content' is missing.", f"{where}.content")
        role = ROLE_ALIASES[role]
        turns.append({"role": role, "content": _content_text(msg["content"], role, where, images, allow_file_urls)})
    return Record(id=f"req-{uuid.uuid4().hex[:12]}", messages=turns, images=images, source="request", index=0)


# --------------------------------------------------------------------------- batching worker

@dataclass(frozen=True)
class GenKey:
    """Settings shared by every prompt of one ``generate`` call. ``seed`` is set only for
    seeded sampling, and then the key is unique to its request (see ``group_jobs``)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    n: int
    seed: int | None = None


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int


@dataclass
class Job:
    prompt: Encoded
    key: GenKey
    n: int                          # choices wanted (greedy generates one and copies it)
    stops: tuple[str, ...]
    future: asyncio.Future


def gen_key(temperature: float | None, top_p: float | None, n: int, max_new_tokens: int,
            seed: int | None) -> GenKey:
    """OpenAI defaults (temperature 1, top_p 1); greedy settings are normalised so that all
    greedy requests share one key (and one batch), whatever their n, top_p or seed."""
    t = 1.0 if temperature is None else float(temperature)
    p = 1.0 if top_p is None else float(top_p)
    if t == 0 or p == 0:  # top_p 0 keeps only the most likely token: greedy
        return GenKey(0.0, 1.0, max_new_tokens, 1)
    return GenKey(t, p, max_new_tokens, n, seed)


def group_jobs(jobs: list[Job], max_rows: int) -> list[list[Job]]:
    """Jobs with equal keys, in arrival order, split so that prompts x n <= ``max_rows``
    (one prompt at least). A seeded job is always alone: its samples then depend only on its
    own seed, not on which other requests happened to arrive with it."""
    groups: dict[Any, list[Job]] = {}
    for k, job in enumerate(jobs):
        groups.setdefault(job.key if job.key.seed is None else (job.key, k), []).append(job)
    out = []
    for members in groups.values():
        size = max(1, max_rows // members[0].key.n)
        out += [members[i:i + size] for i in range(0, len(members), size)]
    return out


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in ``text``, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


def tokens_reaching(ids: list[int], n_chars: int, decode) -> int:
    """Fewest leading tokens of ``ids`` whose decoded text has ``n_chars`` characters (binary
    search: decoding every prefix would be quadratic in the response length)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class BatchStats:
    """How many generate calls ran and how many requests each served (last 1000)."""

    generate_calls: int = 0
    requests: int = 0
    failed_calls: int = 0
    requests_per_call: deque = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict:
        return {"generate_calls": self.generate_calls, "requests": self.requests,
                "failed_calls": self.failed_calls, "requests_per_call": list(self.requests_per_call)}


class BatchWorker:
    """The only user of the model: collects queued requests into batches and generates."""

    def __init__(self, engine: HFEngine, max_batch: int, batch_wait_ms: float):
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = batch_wait_ms / 1000
        self.stats = BatchStats()
        self.queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._active: list[Job] = []
        # generation gets its own thread, so it never waits behind request encoding in the
        # loop's default pool
        self._executor: ThreadPoolExecutor | None = None

    # lifecycle: the queue is created inside the serving loop (a TestClient may start a new
    # loop for every ``with`` block)
    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-generate")
        self._task = asyncio.create_task(self._run(), name="prism-batch-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        leftover = list(self._active)
        while self.queue is not None and not self.queue.empty():
            leftover.append(self.queue.get_nowait())
        _fail(leftover, APIError(503, "The server is shutting down.", type="server_error", code="shutting_down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: Job) -> list[Choice]:
        if self.queue is None:
            raise APIError(503, "The server is not ready.", type="server_error")
        self.queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            self._active = await self._collect()
            try:
                for group in group_jobs(self._active, self.max_batch):
                    await self._run_group(group)
            except Exception as e:
                # a bug here must not stop the worker, which would hang every later request
                log.error("batch worker error", exc_info=e)
                _fail(self._active, APIError(503, f"Internal error: {type(e).__name__}", type="server_error",
                                             code="internal_error"))
            self._active = []

    async def _collect(self) -> list[Job]:
        """The first waiting job, plus any arriving within ``batch_wait_ms`` (up to max_batch)."""
        jobs = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():  # requests that queued during the last generate call
                jobs.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return jobs

    async def _run_group(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # callers that went away
        if not jobs:
            return
        self.stats.generate_calls += 1
        self.stats.requests += len(jobs)
        self.stats.requests_per_call.append(len(jobs))
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, jobs)
        except Exception as e:
            # only this batch fails; the worker goes on with the next one
            self.stats.failed_calls += 1
            log.error("generation failed for a batch of %d requests", len(jobs), exc_info=e)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next batch a chance
            _fail(jobs, APIError(503, f"Generation failed: {type(e).__name__}: {e}", type="server_error",
                                 code="generation_failed"))
            return
        for j, choices in zip(jobs, results):
            if not j.future.done():
                j.future.set_result(choices)

    def _generate(self, jobs: list[Job]) -> list[list[Choice]]:
        """One ``HFEngine.generate`` for the group (runs in a worker thread)."""
        key = jobs[0].key
        params = SamplingParams(n=key.n, max_new_tokens=key.max_new_tokens,
                                temperature=key.temperature, top_p=key.top_p)
        with _seeded(key.seed):
            ro = self.engine.generate([j.prompt for j in jobs], params)
        lengths = ro.response_lengths.tolist()
        out = []
        for i, job in enumerate(jobs):
            rows = range(i * key.n, (i + 1) * key.n)
            choices = [self._choice(ro.response_ids[r, :lengths[r]].tolist(), ro.texts[r],
                                    ro.finish_reasons[r], job.stops) for r in rows]
            out.append(choices * (job.n // key.n))  # greedy: n identical choices
        return out

    def _choice(self, ids: list[int], text: str, finish: str, stops: tuple[str, ...]) -> Choice:
        # stop strings are applied after generation (HFEngine has no per-row stop strings):
        # the text is cut before the stop and the tokens are counted up to its end
        hit = first_stop(text, stops)
        if hit is None:
            return Choice(text, finish, len(ids))
        decode = lambda t: self.engine.processor.tokenizer.decode(t, skip_special_tokens=True)
        return Choice(text[:hit[0]], "stop", tokens_reaching(ids, hit[1], decode))


def _fail(jobs: list[Job], err: APIError) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(err)


@contextmanager
def _seeded(seed: int | None):
    """Seed torch for one generate call, then reseed randomly so later unseeded requests
    do not all repeat the same samples. Safe: only the worker thread generates."""
    if seed is None:
        yield
        return
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.seed()


# --------------------------------------------------------------------------- the app

def context_limit(model) -> int:
    """The model's context length (``max_position_embeddings`` of its text config)."""
    cfg = model.config
    for c in (getattr(cfg, "text_config", None), cfg):
        value = getattr(c, "max_position_embeddings", None) if c is not None else None
        if value:
            return int(value)
    return 32768


@dataclass
class ServerState:
    name: str
    engine: HFEngine
    worker: BatchWorker
    max_context: int
    max_tokens_limit: int
    allow_file_urls: bool
    created: int = field(default_factory=lambda: int(time.time()))
    encode_lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, messages: list[Any]) -> Encoded:
        """Messages -> encoded prompt (runs in a thread: image decoding and processing)."""
        record = messages_to_record(messages, self.allow_file_urls)
        # one encode at a time: a fast tokenizer's Rust state is not meant for concurrent use
        with self.encode_lock:
            try:
                return encode_prompt(self.engine.processor, record)
            except (DataError, ValueError, OSError) as e:
                raise bad_request(f"Cannot process the messages: {e}", "messages") from e

    def max_new_tokens(self, req: ChatRequest, prompt_len: int) -> int:
        """The requested completion budget, checked against the limits."""
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        room = self.max_context - prompt_len
        if asked is not None and asked > self.max_tokens_limit:
            raise bad_request(f"'{name}' is {asked}, over this server's limit of {self.max_tokens_limit} "
                              "tokens.", name, "context_length_exceeded")
        if asked is None:
            asked = min(self.max_tokens_limit, room)
        if asked > room or room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages", "context_length_exceeded")
        return asked


def _completion_body(state: ServerState, prompt_len: int, choices: list[Choice]) -> dict:
    completion_tokens = sum(c.tokens for c in choices)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_len + completion_tokens},
    }


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return
    expected = api_key.encode()

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        # a middleware, so the key is checked before the body is even parsed
        if request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                                code="invalid_api_key").response()
            if not hmac.compare_digest(token.strip().encode(), expected):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key").response()
        return await call_next(request)


# Folder names a training run gives its outputs: alone they do not say which model it is.
_STAGE_OUTPUT = re.compile(r"final|checkpoint-\d+|policy|disc")


def default_model_name(model_dir: str | Path) -> str:
    """The model id served when ``--model-name`` is not given: the checkpoint folder's name,
    with the names of the folders above it while the name is one a run gives its outputs
    (``final``, ``checkpoint-N``, ``policy``, ``disc``), so ``runs/rl/final`` is served as
    ``rl/final`` and ``runs/align/checkpoint-40/policy`` as ``align/checkpoint-40/policy``,
    not as ``final`` or ``policy``. Symbolic links are not followed: the name is the path given."""
    parts = Path(os.path.abspath(model_dir)).parts
    k = len(parts) - 1
    while k > 1 and _STAGE_OUTPUT.fullmatch(parts[k]):
        k -= 1
    return "/".join(parts[k:])


def create_app(model_dir: str | Path, *, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 32, batch_wait_ms: float = 10, max_tokens_limit: int = 4096,
               max_context: int | None = None, dtype: str = "auto", allow_file_urls: bool = True) -> FastAPI:
    """Load the checkpoint in ``model_dir`` and build the server app.

    ``max_batch``: most requests taken per batching round and most rows (prompts x n) per
    generate call. ``max_context``: prompt + completion token limit (default: the model's
    ``max_position_embeddings``). ``max_tokens_limit``: the most completion tokens one
    request may ask for (also the default when it asks for none).
    """
    if max_batch < 1 or batch_wait_ms < 0 or max_tokens_limit < 1:
        raise ValueError("max_batch and max_tokens_limit must be >= 1 and batch_wait_ms >= 0")
    model, processor = load_policy(ModelConfig(path=str(model_dir), dtype=dtype), trainable=False)
    engine = HFEngine(model, processor)
    state = ServerState(
        name=model_name or default_model_name(model_dir), engine=engine,
        worker=BatchWorker(engine, max_batch, batch_wait_ms),
        max_context=max_context or context_limit(model), max_tokens_limit=max_tokens_limit,
        allow_file_urls=allow_file_urls,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            await state.worker.stop()

    app = FastAPI(title="prism-rl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _install_error_handlers(app)
    _install_auth(app, api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "prism-rl"}]}

    @app.get("/v1/stats")
    async def stats():
        queue = state.worker.queue
        return {**state.worker.stats.as_dict(), "queued": queue.qsize() if queue is not None else 0}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.model != state.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves one model, "
                                f"'{state.name}' (prism serve --model-name sets it).", param="model",
                           code="model_not_found")
        _check_supported(req)
        stops = _stop_strings(req.stop)
        prompt = await asyncio.to_thread(state.encode, req.messages)
        key = gen_key(req.temperature, req.top_p, req.n, state.max_new_tokens(req, prompt.prompt_len), req.seed)
        job = Job(prompt, key, req.n, stops, asyncio.get_running_loop().create_future())
        choices = await state.worker.submit(job)
        return _completion_body(state, prompt.prompt_len, choices)

    return app


def run_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
               model_name: str | None = None, max_batch: int = 32, batch_wait_ms: float = 10,
               max_tokens_limit: int = 4096, max_context: int | None = None, dtype: str = "auto",
               threads: int | None = None, log_level: str = "info") -> None:
    """Load the model and serve it with uvicorn until interrupted. ``threads``: torch CPU
    threads (one is fastest for tiny models on a busy machine)."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    app = create_app(model_dir, model_name=model_name, api_key=api_key, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms, max_tokens_limit=max_tokens_limit,
                     max_context=max_context, dtype=dtype)
    state: ServerState = app.state.server
    # the key itself is never logged, only whether one is required
    log.info("serving '%s' on http://%s:%d/v1 (context %d, max batch %d, API key %s)", state.name, host,
             port, state.max_context, max_batch, "required" if api_key else "not required")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
