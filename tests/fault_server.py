"""A loopback OpenAI-compatible fake teacher / judge that injects faults, for curation tests.

``FaultServer`` serves ``POST /v1/chat/completions`` (and ``GET /stats``) with FastAPI +
uvicorn in a background thread on a free ``127.0.0.1`` port. It knows the test problem set
(id, question, ground truth, an ``alias`` form of the answer that only the judge accepts,
whether the prompt holds several sub-questions), finds the problem a request is about by its
question text, and answers like a teacher, a judge or a disambiguator.

Faults are a deterministic function of the request's ``(stage, problem id, attempt, try)``
and the seed, read from the ``X-Prism-Curation-Call`` header the pipeline sends (without the
header the server counts requests per problem instead). So two runs over the same problems
see exactly the same outcomes, whatever the concurrency, and a killed-and-resumed run sees
what an uninterrupted one sees. Per request, first a *transport* fault is drawn (a delay past
the client timeout, 429, 500; a 400 for ids in ``bad_request``); then, for a teacher, a
*content* outcome (truncated with ``finish_reason="length"``, malformed (caption tags
missing), wrong answer, alias answer, or correct). A request carrying the ground-truth hint is answered correctly unless the
problem is in ``always_wrong``. ``forced`` pins the content outcome per (problem, attempt).

Every request is counted by outcome in ``counts`` (thread-safe; also ``GET /stats``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from prism_rl.format import make_response

HEADER = "x-prism-curation-call"
HINT_MARK = "The correct final answer is"
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
# Judge replies in several shapes so the pipeline's verdict parser is exercised.
_JUDGE_STYLES = ["{V}", "Verdict: {V}", "**{V}**", '{{"verdict": "{v}"}}',
                 "<think>the candidate may be wrong, or correct</think>\n{V}"]


@dataclass
class FaultRates:
    """Probabilities (per request) of each fault; transport and content draws are separate."""

    timeout: float = 0.0
    rate_limit: float = 0.0
    server_error: float = 0.0
    truncated: float = 0.0
    malformed: float = 0.0
    wrong: float = 0.0
    alias: float = 0.0


@dataclass
class Problem:
    id: str
    question: str
    ground_truth: str
    alias: str | None = None
    multi: bool = False


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(h[:13], 16) / 16 ** 13


@dataclass
class FaultServer:
    problems: list[Problem]
    rates: FaultRates = field(default_factory=FaultRates)
    seed: int = 0
    delay_s: float = 1.0
    forced: dict[str, list[str]] = field(default_factory=dict)
    always_wrong: set[str] = field(default_factory=set)
    api_key: str | None = None
    latency_s: float = 0.0  # added to every answer, to make runs last long enough to kill
    bad_request: set[str] = field(default_factory=set)  # ids whose teacher calls get a 400

    def __post_init__(self) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self._by_question = sorted(self.problems, key=lambda p: -len(p.question))
        self._by_id = {p.id: p for p in self.problems}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; no bind race
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self._seen.clear()

    # ------------------------------------------------------------------ app
    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/stats")
        async def stats():
            with self._lock:
                return dict(self.counts)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            if self.api_key is not None and \
                    request.headers.get("authorization") != f"Bearer {self.api_key}":
                self.count("unauthorized")
                return _error(401, "invalid api key")
            try:
                body = await request.json()
            except ClientDisconnect:  # a killed client mid-request (the kill-and-resume test)
                self.count("client_disconnect")
                return _error(499, "client went away")
            return await self._answer(body, request.headers.get(HEADER))

        return app

    async def _answer(self, body: dict, header: str | None):
        messages = body.get("messages", [])
        text = _all_text(messages)
        stage, pid, attempt, try_no = self._call_id(header, messages, text)
        self.count("requests")
        self.count(f"stage.{stage}")
        problem = self._by_id.get(pid) or self._find(text)
        if problem is None:
            return _error(400, "unknown problem")
        pid = problem.id
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if stage == "teacher" and pid in self.bad_request:
            self.count("bad_request")
            return _error(400, "image too large")
        u = unit(self.seed, "transport", stage, pid, attempt, try_no)
        r = self.rates
        if u < r.timeout:
            self.count("timeout")
            await asyncio.sleep(self.delay_s)  # past the client's timeout; it has hung up
            return _error(504, "too late")
        if u < r.timeout + r.rate_limit:
            self.count("rate_limit")
            return _error(429, "slow down")
        if u < r.timeout + r.rate_limit + r.server_error:
            self.count("server_error")
            return _error(500, "boom")
        if stage == "judge":
            return self._judge(problem, text, attempt)
        if stage == "disambiguate":
            self.count("disambiguate")
            reply = (f"REWRITTEN:\n{problem.question} Answer only the first sub-question."
                     if problem.multi else "SINGLE")
            return _completion(reply, "stop", text)
        return self._teach(problem, text, attempt)

    def _call_id(self, header: str | None, messages: list, text: str):
        if header:
            stage, pid, attempt, try_no = header.split("/")
            return stage, unquote(pid), int(attempt), int(try_no)
        # No header: infer the stage from the prompt and number requests per problem.
        system = next((m.get("content") for m in messages if m.get("role") == "system"), "")
        stage = "judge" if "grader" in str(system) else \
            "disambiguate" if "REWRITTEN" in text else "teacher"
        problem = self._find(text)
        key = (stage, problem.id if problem else "?")
        with self._lock:
            self._seen[key] += 1
            n = self._seen[key]
        return stage, key[1], n, 0

    def _find(self, text: str) -> Problem | None:
        return next((p for p in self._by_question if p.question in text), None)

    def _outcome(self, problem: Problem, attempt: int, hinted: bool) -> str:
        forced = self.forced.get(problem.id)
        if forced and attempt <= len(forced):
            outcome = forced[attempt - 1]
        else:
            u, r, outcome = unit(self.seed, "content", problem.id, attempt), self.rates, "ok"
            for name in ("truncated", "malformed", "wrong", "alias"):
                if u < getattr(r, name):
                    outcome = name
                    break
                u -= getattr(r, name)
        if hinted and outcome in ("wrong", "alias"):
            outcome = "ok"  # a teacher told the answer writes a solution reaching it
        if problem.id in self.always_wrong and outcome in ("ok", "alias"):
            outcome = "wrong"
        return outcome

    def _teach(self, problem: Problem, text: str, attempt: int):
        hinted = HINT_MARK in text
        if hinted:
            self.count("hinted")
        outcome = self._outcome(problem, attempt, hinted)
        self.count(outcome)
        gt = problem.ground_truth
        answer = {"wrong": _wrong(gt), "alias": problem.alias or gt}.get(outcome, gt)
        steps = " ".join(f"Step {k}: look again." for k in range(int(unit(problem.id) * 6)))
        full = make_response(f"- white background\n- objects for {problem.id}",
                             f"{steps} So the answer is {answer}.", answer)
        if outcome == "truncated":
            return _completion(full[: len(full) // 2], "length", text)
        if outcome == "malformed":
            return _completion(full.split("</caption>", 1)[1], "stop", text)
        return _completion(full, "stop", text)

    def _judge(self, problem: Problem, text: str, attempt: int):
        cand = _field(text, "Candidate answer:")
        ok = cand in {problem.ground_truth, problem.alias}
        self.count("judge_correct" if ok else "judge_incorrect")
        style = _JUDGE_STYLES[int(unit(self.seed, "style", problem.id, attempt) *
                                  len(_JUDGE_STYLES))]
        verdict = "CORRECT" if ok else "INCORRECT"
        return _completion(style.format(V=verdict, v=verdict.lower()), "stop", text)


def _all_text(messages: list) -> str:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p.get("text", "") for p in content if p.get("type") == "text"]
    return "\n".join(out)


def _field(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(label):
            return line[len(label):].strip()
    return ""


def _wrong(gt: str) -> str:
    try:
        return str(int(gt) + 1)
    except ValueError:
        return gt + "x"


def _completion(content: str, finish: str, prompt: str) -> JSONResponse:
    return JSONResponse({
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
        "model": "fault-teacher",
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": len(prompt) // 4 + 1,
                  "completion_tokens": len(content) // 4 + 1,
                  "total_tokens": len(prompt) // 4 + len(content) // 4 + 2},
    })


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "fault", "code": status}},
                        status_code=status)


def make_problems(n: int, *, multi_every: int = 0) -> list[Problem]:
    """``n`` counting problems with numeric answers 1..20 and their number-word aliases."""
    out = []
    for i in range(n):
        gt = 1 + (i * 7) % 20
        multi = bool(multi_every) and i % multi_every == 0
        q = f"Problem p{i:03d}: how many shapes are in the image?"
        if multi:
            q += " (a) how many are red? (b) how many are blue?"
        out.append(Problem(f"p{i:03d}", q, str(gt), NUMBER_WORDS[gt], multi))
    return out


if __name__ == "__main__":  # handy for poking at it by hand
    server = FaultServer(make_problems(5), FaultRates(rate_limit=0.2)).start()
    print(json.dumps({"base_url": server.base_url}))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


def write_problem_file(problems: list[Problem], path) -> None:
    """Write ``problems`` as a verl parquet problem set (one small PNG each, no response)."""
    import io

    from PIL import Image

    from prism_rl.data.layouts import write_verl_parquet
    from prism_rl.data.records import ImageRef, Record
    from prism_rl.format import SYSTEM_PROMPT

    records = []
    for i, p in enumerate(problems):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * (i % 6), 90, 160)).save(buf, format="PNG")
        records.append(Record(
            id=p.id, index=i, task="count", ground_truth=p.ground_truth,
            images=[ImageRef(data=buf.getvalue())],
            messages=[{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": "<image>" + p.question}]))
    write_verl_parquet(records, path)
