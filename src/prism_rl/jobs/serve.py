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
one rollout-engine ``generate`` per group (``make_engine('auto')``: the
graph engine on a GPU, transformers' ``generate`` on the CPU) on its own generation thread, so the event loop keeps
accepting requests (which form the next batch) while the model works.

Every error is answered in OpenAI's shape ``{"error": {message, type, param, code}}`` with a
4xx status (503 when generation itself fails); the server keeps serving.

Hostile or careless clients (:mod:`prism_rl.jobs.serve_guards`, :mod:`prism_rl.jobs.serve_requests`):
a body over ``max_body_bytes`` is refused unread (413); a request's images may hold at most
``max_image_pixels`` pixels, read from their headers before any is decoded (400); at most
``max_queue`` requests are in flight, one more gets a 429; a request whose client has gone is
dropped before it is encoded or generated (a generate call already running finishes). Images
come from base64 ``data:`` URLs, and from ``file://`` URLs only inside ``file_url_dir``
(``--allow-file-urls DIR``; off by default). Encoding (image decoding included) runs one
request at a time, so images in memory are one request's at most.
"""

from __future__ import annotations

import asyncio
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ModelConfig
from ..data.processing import Encoded, encode_prompt
from ..data.records import DataError
from ..models.loading import load_policy
from ..rollout import make_engine
from ..rollout.base import RolloutEngine, SamplingParams
from .serve_guards import Admission, ApiKeyMiddleware, BodyLimitMiddleware, ClientGone, unless_gone
from .serve_requests import (
    APIError,
    ChatRequest,
    ImagePolicy,
    bad_request,
    check_supported,
    messages_to_record,
    stop_strings,
    validation_error,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "PRISM_API_KEY"
DEFAULT_MAX_BODY_BYTES = 8 * 2**20           # a 6 MB image as base64, or ~8 MB of text
DEFAULT_MAX_IMAGE_PIXELS = ImagePolicy.max_request_pixels  # per request; Qwen3-VL's processor resizes above it
DEFAULT_MAX_QUEUE = 256
MIN_TEMPERATURE = 1e-4


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_req: Request, exc: APIError):
        return exc.response()

    async def validation(_req: Request, exc: RequestValidationError):
        return validation_error(exc).response()

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
    greedy requests share one key (and one batch), whatever their n, top_p or seed.

    A temperature under ``MIN_TEMPERATURE`` is greedy too: sampling divides the logits by it,
    and 1e-286 turns them into infinities (every sample fails); at 1e-4 the distribution is
    already the argmax but for logits within ~1e-3 of each other."""
    t = 1.0 if temperature is None else float(temperature)
    p = 1.0 if top_p is None else float(top_p)
    if t < MIN_TEMPERATURE or p == 0:  # top_p 0 keeps only the most likely token: greedy
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
    """How many generate calls ran and how many requests each served (last 1000); how many
    requests were dropped because their client had gone."""

    generate_calls: int = 0
    requests: int = 0
    failed_calls: int = 0
    dropped: int = 0
    requests_per_call: deque = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict:
        return {"generate_calls": self.generate_calls, "requests": self.requests,
                "failed_calls": self.failed_calls, "dropped": self.dropped,
                "requests_per_call": list(self.requests_per_call)}


class BatchWorker:
    """The only user of the model: collects queued requests into batches and generates."""

    def __init__(self, engine: RolloutEngine, max_batch: int, batch_wait_ms: float):
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

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; its future gets the choices. Cancelling the future takes the job out
        (the worker skips done futures when it collects and again before generating)."""
        if self.queue is None:
            raise APIError(503, "The server is not ready.", type="server_error")
        self.queue.put_nowait(job)
        return job.future

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
        """The first waiting job, plus any arriving within ``batch_wait_ms`` (up to max_batch);
        jobs whose caller went away meanwhile are dropped, not counted."""
        jobs = []
        while not jobs:
            jobs = self._live([await self.queue.get()])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():  # requests that queued during the last generate call
                jobs += self._live([self.queue.get_nowait()])
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                jobs += self._live([await asyncio.wait_for(self.queue.get(), left)])
            except TimeoutError:
                break
        return jobs

    @staticmethod
    def _live(jobs: list[Job]) -> list[Job]:
        return [j for j in jobs if not j.future.done()]

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
        """One ``engine.generate`` for the group (runs in the one worker thread)."""
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
        # stop strings are applied after generation (the engines stop rows on EOS only):
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
    engine: RolloutEngine
    worker: BatchWorker
    max_context: int
    max_tokens_limit: int
    images: ImagePolicy
    admission: Admission
    created: int = field(default_factory=lambda: int(time.time()))
    encode_lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, messages: list[Any], gone: threading.Event) -> Encoded:
        """Messages -> encoded prompt (runs in a thread: image decoding and processing).

        One request at a time: a fast tokenizer's Rust state is not meant for concurrent use,
        and decoded images then never pile up in memory. A request whose client left while it
        waited for its turn (``gone``) is not encoded."""
        with self.encode_lock:
            if gone.is_set():
                raise ClientGone()
            record = messages_to_record(messages, self.images)
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
               max_context: int | None = None, dtype: str = "auto", file_url_dir: str | Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """Load the checkpoint in ``model_dir`` and build the server app.

    ``max_batch``: most requests taken per batching round and most rows (prompts x n) per
    generate call. ``max_context``: prompt + completion token limit (default: the model's
    ``max_position_embeddings``). ``max_tokens_limit``: the most completion tokens one
    request may ask for (also the default when it asks for none). ``file_url_dir``: the one
    folder ``file://`` image URLs may read (``None``: refused). ``max_body_bytes``,
    ``max_image_pixels`` (per request) and ``max_queue`` (requests in flight): see the module
    docstring.
    """
    if min(max_batch, max_tokens_limit, max_body_bytes, max_image_pixels, max_queue) < 1 or batch_wait_ms < 0:
        raise ValueError("max_batch, max_tokens_limit, max_body_bytes, max_image_pixels and max_queue must be "
                         ">= 1 and batch_wait_ms >= 0")
    if file_url_dir is not None and not Path(file_url_dir).is_dir():
        raise NotADirectoryError(f"--allow-file-urls {file_url_dir}: not a folder")
    model, processor = load_policy(ModelConfig(path=str(model_dir), dtype=dtype), trainable=False)
    engine = make_engine("auto", model, processor)   # the graph engine on a GPU (its buffers are reused by smaller batches)
    state = ServerState(
        name=model_name or default_model_name(model_dir), engine=engine,
        worker=BatchWorker(engine, max_batch, batch_wait_ms),
        max_context=max_context or context_limit(model), max_tokens_limit=max_tokens_limit,
        images=ImagePolicy(file_url_dir, max_image_pixels), admission=Admission(max_queue),
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
    # the last added runs first: the key is checked before the body's size, and neither reads it
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _install_routes(app, state)
    return app


def _install_routes(app: FastAPI, state: ServerState) -> None:
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
        return {**state.worker.stats.as_dict(), "queued": queue.qsize() if queue is not None else 0,
                "in_flight": state.admission.in_flight, "refused_busy": state.admission.refused}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if req.model != state.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves one model, "
                                f"'{state.name}' (prism serve --model-name sets it).", param="model",
                           code="model_not_found")
        check_supported(req)
        stops = stop_strings(req.stop)
        with state.admission:
            try:
                return await _complete(state, req, request, stops)
            except ClientGone:
                state.worker.stats.dropped += 1
                log.info("dropped a request: its client closed the connection")
                raise


async def _complete(state: ServerState, req: ChatRequest, request: Request, stops: tuple[str, ...]) -> dict:
    """Encode, queue and wait for one request, dropping it as soon as its client has gone."""
    gone = threading.Event()
    prompt = await unless_gone(request, asyncio.to_thread(state.encode, req.messages, gone), gone)
    key = gen_key(req.temperature, req.top_p, req.n, state.max_new_tokens(req, prompt.prompt_len), req.seed)
    job = Job(prompt, key, req.n, stops, asyncio.get_running_loop().create_future())
    future = state.worker.submit(job)
    choices = await unless_gone(request, asyncio.shield(future), gone, on_gone=future.cancel)
    return _completion_body(state, prompt.prompt_len, choices)


def run_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
               threads: int | None = None, log_level: str = "info", **app_options: Any) -> None:
    """Load the model and serve it with uvicorn until interrupted. ``threads``: torch CPU
    threads (one is fastest for tiny models on a busy machine); ``app_options`` go to
    :func:`create_app`."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    app = create_app(model_dir, api_key=api_key, **app_options)
    state: ServerState = app.state.server
    # the key itself is never logged, only whether one is required
    log.info("serving '%s' on http://%s:%d/v1 (context %d, max batch %d, API key %s, file URLs %s)", state.name,
             host, port, state.max_context, state.worker.max_batch, "required" if api_key else "not required",
             f"from {state.images.file_url_dir}" if state.images.file_url_dir is not None else "off")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
