"""Teacher-demonstration curation (METHOD.md section 3).

``curate`` turns a problem set (question + images + ground truth, any file ``read_records``
reads) into verified teacher demonstrations in the PRISM format:

1. **Disambiguation** (optional): the teacher is asked whether the prompt holds one question;
   if not, it rewrites it into one self-contained question whose one answer is the ground
   truth. A reply saying the prompt is already single, or one that cannot be parsed, keeps
   the original prompt.
2. **Generation**: the PRISM system prompt + the question, images as base64 ``data:`` URL
   parts, through the official ``openai`` client (``chat.completions.create``).
3. **Filters, in order**: (1) truncation (``finish_reason == "length"``) or a failed call,
   (2) format (``is_format_valid(strict=True)``: all three tags, each non-empty),
   (3) correctness: ``reward.is_correct`` on the ``<answer>`` first; only when the rules say
   wrong is the LLM judge asked (if a judge endpoint is given).
4. **Regeneration**, at most ``max_attempts`` attempts per problem: a (1) or (2) failure
   regenerates the same request; a (3) failure resubmits with the ground truth appended
   ("The correct final answer is X; write a solution that reaches it."), and every later
   attempt keeps that hint (so does a judge that fails or gives no verdict: the answer could
   not be verified). The hint is only in the request: the stored demonstration's prompt is
   the plain question. A 400-class reply ends the problem at once (the same request would
   fail again). Every attempt and its rejection reason is recorded.

Transport and retry policy (one request = one *call*; each call is retried on its own):

* retried: timeouts, connection errors, HTTP 429 and HTTP 5xx (and unparseable bodies), at
  most ``max_retries`` times, sleeping ``d * U(0.5, 1)`` with ``d = min(30 s, backoff_base_s
  * 2**k)`` before retry ``k + 1`` (at least the server's ``Retry-After`` on a 429). The
  jitter comes from a ``random.Random`` seeded by ``(seed, problem id)``, so a problem's
  schedule does not depend on what else runs concurrently.
* not retried: other 4xx. 400/413/422 (something about this request) end the problem as
  rejected (``call_failed:http_400``); 401/403/404 (wrong key, URL or model) and connection
  errors that outlast the retries abort the whole run with :class:`CurationError`: marking
  every problem as failed would make a rerun with fixed settings skip them all.
* the ``openai`` client's own retries are off (``max_retries=0``) so every retry is counted
  by cause. Each request carries an ``X-Prism-Curation-Call: stage/id/attempt/try`` header
  so server logs can be matched to the report.

Concurrency: ``concurrency`` workers on one asyncio loop, each working on one problem at a
time (its calls are sequential), so at most ``concurrency`` requests are in flight. The
rule check runs in a thread so a slow ``math_verify`` fallback does not stall the loop.

Crash safety: each finished problem (accepted or rejected) is appended to
``out_dir/results.jsonl`` as **one** line written with a single ``write`` on an
``O_APPEND`` descriptor, then ``fsync``. On start, a trailing partial line (a kill during
the write) is cut off and problems already in the file are skipped by id, so a rerun after
a kill loses and duplicates nothing. Problems in flight at the kill are redone from
attempt 1 (the usage of their lost calls is not in the report; ``run`` in the report
covers this process only). Pools and the report are always recomputed from the whole results
file, so they cover every run that contributed to it.

Outputs in ``out_dir``: ``results.jsonl`` (the log above), ``sft.json`` (ShareGPT, images
under ``images/``), ``align.parquet`` (verl layout with ``teacher_caption``,
``teacher_cot``, ``teacher_response``) and ``report.json``. The two pools are disjoint:
the best ``alignment_share`` of accepted demonstrations go to alignment, the rest to SFT.

Quality (best first; deterministic, no extra model calls), the key of :func:`quality_key`:

  tier 0: correct on the first attempt, by the rules;
  tier 1: correct by the rules after regenerating for truncation/format/call failures;
  tier 2: correct by the judge only (the rules said wrong), without the ground-truth hint;
  tier 3: needed the ground-truth hint, correct by the rules;
  tier 4: needed the hint, correct by the judge only;
  then the shorter response (characters) first, then the problem id.

API keys are read from the environment variable named by ``Endpoint.api_key_env`` when a
client is built; they are never stored in the endpoint, results, report or log messages
(error text from the server is scrubbed of them too).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
from PIL import Image

from prism_rl.data.layouts import read_records, write_sharegpt_json, write_verl_parquet
from prism_rl.data.records import IMAGE_PLACEHOLDER, DataError, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, is_format_valid, parse_response, split_text
from prism_rl.reward import is_correct

__all__ = [
    "CALL_HEADER",
    "CurationError",
    "CurationReport",
    "Endpoint",
    "curate",
    "parse_disambiguation",
    "parse_verdict",
    "quality_key",
]

log = logging.getLogger(__name__)

CALL_HEADER = "X-Prism-Curation-Call"
RESULTS_FILE = "results.jsonl"
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
NO_KEY = "EMPTY"  # local OpenAI-compatible servers want some bearer token, any will do

HINT_TEMPLATE = "\n\nThe correct final answer is {answer}; write a solution that reaches it."

JUDGE_SYSTEM = (
    "You are a strict grader. Decide whether the candidate's final answer to a problem is "
    "equivalent to the reference answer (same value or same choice; different notation, "
    "units or wording is fine). Reply with one word: CORRECT or INCORRECT."
)
JUDGE_USER = "Question:\n{question}\n\nReference answer: {reference}\nCandidate answer: {candidate}"

DISAMBIGUATE_SYSTEM = (
    "You prepare visual problems for a solver. A problem must ask exactly one question with "
    "exactly one answer. Some images hold several sub-questions."
)
DISAMBIGUATE_USER = (
    "Problem:\n{question}\n\nReference answer: {reference}\n\n"
    "If the problem asks exactly one question, reply with the single word SINGLE.\n"
    "Otherwise rewrite it as one self-contained question whose only answer is the reference "
    "answer (do not reveal the answer), and reply in this form:\n"
    "REWRITTEN:\n<the rewritten question>"
)

# Quality tiers by (needed the hint, accepted by); attempt 1 + rules is tier 0 (see module).
_TIERS = {(False, "rules"): 1, (False, "judge"): 2, (True, "rules"): 3, (True, "judge"): 4}
_RUN_ABORT_STATUS = {401, 403, 404}
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class CurationError(RuntimeError):
    """The run cannot go on (bad endpoint, key, model, unreachable server, bad input)."""


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: ``base_url`` (ending in ``/v1``), ``model``, and the
    name of the environment variable holding its API key (``None``: no key needed)."""

    base_url: str
    model: str
    api_key_env: str | None = None

    def api_key(self) -> str:
        """The key from the environment (never stored on the object)."""
        if self.api_key_env is None:
            return NO_KEY
        key = os.environ.get(self.api_key_env)
        if not key:
            raise CurationError(f"environment variable {self.api_key_env} (API key for "
                                f"{self.base_url}) is not set")
        return key


@dataclass
class CurationReport:
    """What a run produced; ``to_dict()`` is what ``report.json`` holds."""

    out_dir: str
    problems: int
    finished: int
    accepted: int
    rejected: int
    sft: int
    alignment: int
    accepted_by: dict[str, int]
    filters: dict[str, dict[str, Any]]
    attempts_histogram: dict[str, dict[str, int]]
    rejection_reasons: dict[str, dict[str, int]]
    hint_resubmissions: int
    disambiguation: dict[str, int]
    usage: dict[str, Any]
    errors_by_cause: dict[str, int]
    retries_by_cause: dict[str, int]
    run: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- reply parsing


def _strip_reasoning(text: str) -> str:
    """Drop ``<think>`` blocks (and anything before a lone ``</think>``) of reasoning models."""
    text = _THINK_BLOCK_RE.sub(" ", text or "")
    cut = text.lower().rfind("</think>")
    return text[cut + len("</think>"):] if cut >= 0 else text


_VERDICT_KEY_RE = re.compile(r"verdict\W{0,5}\s*(?:is\s*)?\W{0,3}(correct|incorrect)", re.I)
_VERDICT_WORD_RE = re.compile(
    r"\b(incorrect|not\s+correct|not\s+equivalent|wrong|false|no|correct|equivalent|right|"
    r"true|yes)\b", re.I)
_NEGATIVE = {"incorrect", "wrong", "false", "no"}


def parse_verdict(text: str | None) -> bool | None:
    """The judge's verdict: ``True``/``False``, or ``None`` when the reply says neither.

    Tries, in order: a JSON object with ``verdict``/``correct``; an explicit
    ``Verdict: X``; the verdict words (``CORRECT``/``INCORRECT`` and synonyms) outside any
    ``<think>`` block: one polarity only decides, with both the first one decides (the
    prompt asks for the verdict first). Markdown, case and punctuation are ignored.
    """
    body = _strip_reasoning(text or "")
    from_json = _json_verdict(body)
    if from_json is not None:
        return from_json
    m = _VERDICT_KEY_RE.search(body)
    if m:
        return m.group(1).lower() == "correct"
    words = [re.sub(r"\s+", " ", w.lower()) for w in _VERDICT_WORD_RE.findall(body)]
    if not words:
        return None
    polarities = {not (w in _NEGATIVE or w.startswith("not ")) for w in words}
    if len(polarities) == 1:
        return polarities.pop()
    first = words[0]
    return not (first in _NEGATIVE or first.startswith("not "))


def _json_verdict(body: str) -> bool | None:
    m = re.search(r"\{.*?\}", body, re.DOTALL)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    value = obj.get("verdict", obj.get("correct"))
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("correct", "incorrect"):
        return value.strip().lower() == "correct"
    return None


def parse_disambiguation(text: str | None) -> tuple[str, str | None]:
    """``("rewritten", question)``, ``("single", None)`` or ``("unparsed", None)``."""
    body = _strip_reasoning(text or "").strip()
    m = re.search(r"REWRITTEN\s*:\s*(.*)", body, re.DOTALL | re.IGNORECASE)
    if m and m.group(1).strip():
        return "rewritten", m.group(1).strip()
    if re.search(r"\bSINGLE\b", body, re.IGNORECASE):
        return "single", None
    return "unparsed", None


# --------------------------------------------------------------------------- request building


def _image_url(ref: ImageRef) -> str:
    """A base64 ``data:`` URL of the image's original bytes (no re-encoding)."""
    if ref.data is not None:
        data = ref.data
    else:
        p = Path(ref.path or "")
        if not p.is_absolute() and ref.base_dir is not None:
            p = Path(ref.base_dir) / p
        data = p.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        mime = Image.MIME.get(img.format or "", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _parts(text: str, urls: list[str]) -> list[dict[str, Any]]:
    """OpenAI content parts: text with each ``<image>`` placeholder replaced by an image."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image_url", "image_url": {"url": urls[k - 1]}})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _turns(messages: list[dict[str, str]], urls: list[str], hint: str = "") -> list[dict]:
    """Non-system turns as OpenAI messages; images in order; ``hint`` ends the last user turn."""
    out, used = [], 0
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        text = m["content"] + (hint if i == last_user else "")
        n = text.count(IMAGE_PLACEHOLDER)
        content = _parts(text, urls[used:used + n]) if m["role"] == "user" else text
        used += n
        out.append({"role": m["role"], "content": content})
    return out


def _with_question(messages: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    """The prompt with the last user turn's text replaced (its image placeholders kept, first)."""
    out = [dict(m) for m in messages]
    i = max(k for k, m in enumerate(out) if m["role"] == "user")
    out[i]["content"] = IMAGE_PLACEHOLDER * out[i]["content"].count(IMAGE_PLACEHOLDER) + question
    return out


def _demo_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The stored prompt: the PRISM system prompt, then the problem's own non-system turns."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            *(dict(m) for m in messages if m["role"] != "system")]


# --------------------------------------------------------------------------- calling


@dataclass
class _Reply:
    """One call's outcome after retries: text + finish reason, or an error cause."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    permanent: bool = False  # a non-retryable 4xx: regenerating the same request is pointless


class _Caller:
    """Sends chat requests with counted, seeded, exponential-backoff retries."""

    def __init__(self, *, timeout_s: float, max_retries: int, backoff_base_s: float,
                 max_tokens: int):
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.max_tokens = max_tokens
        self._clients: dict[tuple[str, str | None], openai.AsyncOpenAI] = {}
        self._secrets: list[str] = []

    def client(self, ep: Endpoint) -> openai.AsyncOpenAI:
        key = (ep.base_url, ep.api_key_env)
        if key not in self._clients:
            api_key = ep.api_key()
            if api_key != NO_KEY:
                self._secrets.append(api_key)
            self._clients[key] = openai.AsyncOpenAI(
                base_url=ep.base_url, api_key=api_key, timeout=self.timeout_s, max_retries=0)
        return self._clients[key]

    def scrub(self, text: str) -> str:
        """``text`` with every API key in use replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()

    def backoff(self, k: int, rng: random.Random, retry_after: float | None) -> float:
        """Sleep before retry ``k + 1``: ``min(cap, base * 2**k) * U(0.5, 1)`` (see module)."""
        d = min(BACKOFF_CAP_S, self.backoff_base_s * (2 ** k)) * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            d = max(d, min(retry_after, RETRY_AFTER_CAP_S))
        return d

    async def call(self, ep: Endpoint, stage: str, messages: list[dict], tag: str,
                   rng: random.Random, usage: Counter) -> _Reply:
        """One logical request; ``usage`` gets calls, tokens, errors and retries by cause."""
        client = self.client(ep)
        cause = "none"
        for k in range(self.max_retries + 1):
            usage[f"calls.{stage}"] += 1
            retry_after = None
            try:
                resp = await client.chat.completions.create(
                    model=ep.model, messages=messages, max_tokens=self.max_tokens,
                    extra_headers={CALL_HEADER: f"{tag}/{k}"})
            except openai.APITimeoutError:
                cause = "timeout"  # before APIConnectionError: it is a subclass
            except openai.APIConnectionError:
                cause = "connection"
            except openai.APIStatusError as e:
                code = e.status_code
                if code in _RUN_ABORT_STATUS:
                    raise CurationError(f"{stage} endpoint {ep.base_url} (model {ep.model}) "
                                        f"answered HTTP {code}: {self.scrub(str(e))[:300]}") from None
                if code == 429:
                    cause, retry_after = "rate_limit", _retry_after(e)
                elif code >= 500:
                    cause = "server_error"
                else:
                    usage[f"errors.http_{code}"] += 1
                    return _Reply(error=f"http_{code}", permanent=True)
            except openai.APIError:
                cause = "bad_response"  # e.g. a body that is not a chat completion
            else:
                return _read_reply(resp, stage, usage)
            usage[f"errors.{cause}"] += 1
            if k == self.max_retries:
                break
            usage[f"retries.{cause}"] += 1
            await asyncio.sleep(self.backoff(k, rng, retry_after))
        if cause == "connection":
            raise CurationError(f"{stage} endpoint {ep.base_url} unreachable after "
                                f"{self.max_retries} retries")
        return _Reply(error=cause)


def _retry_after(e: openai.APIStatusError) -> float | None:
    try:
        return float(e.response.headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None


def _read_reply(resp: Any, stage: str, usage: Counter) -> _Reply:
    u = getattr(resp, "usage", None)
    if u is not None:
        usage[f"prompt_tokens.{stage}"] += u.prompt_tokens or 0
        usage[f"completion_tokens.{stage}"] += u.completion_tokens or 0
    if not resp.choices:
        usage["errors.empty_choices"] += 1
        return _Reply(error="empty_choices")
    choice = resp.choices[0]
    return _Reply(text=choice.message.content or "", finish_reason=choice.finish_reason)


# --------------------------------------------------------------------------- one problem


class _Solver:
    """Runs one problem through disambiguation, generation, filters and regeneration."""

    def __init__(self, caller: _Caller, teacher: Endpoint, judge: Endpoint | None, *,
                 disambiguate: bool, max_attempts: int, seed: int):
        self.caller = caller
        self.teacher = teacher
        self.judge = judge
        self.disambiguate = disambiguate
        self.max_attempts = max_attempts
        self.seed = seed

    async def solve(self, rec: Record) -> dict[str, Any]:
        """The problem's final result line (see ``results.jsonl`` in the module docstring)."""
        usage: Counter = Counter()
        result: dict[str, Any] = {"id": rec.id, "status": "rejected", "reason": None,
                                  "accepted_by": None, "hinted": False, "first_try": False,
                                  "rewritten_question": None, "disambiguation": None,
                                  "response": None, "attempts": [], "usage": usage}
        if not (rec.ground_truth or "").strip():
            result["reason"] = "no_ground_truth"
            return _finish(result)
        rng = random.Random(f"{self.seed}:{rec.id}")
        try:
            urls = [_image_url(ref) for ref in rec.images]
        except (OSError, ValueError) as e:  # one unreadable image must not stop the run
            result.update(reason="bad_image", detail=str(e)[:200])
            return _finish(result)
        messages = rec.messages
        if self.disambiguate:
            messages = await self._disambiguate(rec, urls, rng, usage, result)
        question = [m for m in messages if m["role"] == "user"][-1]["content"]
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        hint = ""
        for n in range(1, self.max_attempts + 1):
            attempt = await self._attempt(rec, messages, question, urls, hint, n, rng, usage)
            result["attempts"].append(attempt)
            if attempt["outcome"] == "accepted":
                result.update(status="accepted", reason=None, accepted_by=attempt["check"],
                              hinted=bool(hint), first_try=(n == 1),
                              response=attempt.pop("response"))
                return _finish(result)
            attempt.pop("response", None)
            result["reason"] = attempt["outcome"]
            if attempt.get("permanent"):
                break
            if attempt["outcome"].startswith(("wrong_answer", "judge_failed")):
                hint = HINT_TEMPLATE.format(answer=rec.ground_truth.strip())
        return _finish(result)

    async def _disambiguate(self, rec: Record, urls: list[str], rng: random.Random,
                            usage: Counter, result: dict) -> list[dict[str, str]]:
        prompt = DISAMBIGUATE_USER.format(question=rec.question, reference=rec.ground_truth)
        n_img = len(urls)
        msgs = [{"role": "system", "content": DISAMBIGUATE_SYSTEM},
                {"role": "user", "content": _parts(IMAGE_PLACEHOLDER * n_img + prompt, urls)}]
        reply = await self.caller.call(self.teacher, "disambiguate", msgs,
                                       _tag("disambiguate", rec.id, 0), rng, usage)
        if reply.error:
            result["disambiguation"] = f"failed:{reply.error}"
            return rec.messages
        kind, question = parse_disambiguation(reply.text)
        result["disambiguation"] = kind
        if kind != "rewritten":
            return rec.messages
        result["rewritten_question"] = question
        return _with_question(rec.messages, question)

    async def _attempt(self, rec: Record, messages: list[dict[str, str]], question: str,
                       urls: list[str], hint: str, n: int, rng: random.Random,
                       usage: Counter) -> dict[str, Any]:
        """One generation + the three filters; ``outcome`` is ``accepted`` or the reason."""
        att: dict[str, Any] = {"n": n, "hint": bool(hint), "outcome": None,
                               "finish_reason": None, "answer": None, "check": None, "chars": 0}
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, *_turns(messages, urls, hint)]
        reply = await self.caller.call(self.teacher, "teacher", msgs,
                                       _tag("teacher", rec.id, n), rng, usage)
        text = reply.text.strip()
        att.update(finish_reason=reply.finish_reason, chars=len(text))
        # Filter 1: truncation or failed call.
        if reply.error:
            att.update(outcome=f"call_failed:{reply.error}", permanent=reply.permanent)
            return att
        if reply.finish_reason == "length":
            att["outcome"] = "truncated"
            return att
        # Filter 2: format, all three parts present and non-empty.
        if not is_format_valid(text, strict=True):
            att["outcome"] = "format"
            return att
        # Filter 3: correctness, rules first, the judge only when the rules say wrong.
        answer = parse_response(text).answer
        att["answer"] = answer[:200]
        if await asyncio.to_thread(is_correct, answer, rec.ground_truth):
            att.update(outcome="accepted", check="rules", response=text)
            return att
        if self.judge is None:
            att["outcome"] = "wrong_answer"
            return att
        verdict = await self._judge(rec, question, answer, n, rng, usage)
        att["judge"] = verdict
        if verdict == "correct":
            att.update(outcome="accepted", check="judge", response=text)
        elif verdict == "incorrect":
            att["outcome"] = "wrong_answer"
        else:
            att["outcome"] = f"judge_failed:{verdict}"
        return att

    async def _judge(self, rec: Record, question: str, answer: str, n: int,
                     rng: random.Random, usage: Counter) -> str:
        """``correct``, ``incorrect``, ``unparsed`` or the call's error cause."""
        user = JUDGE_USER.format(question=question, reference=rec.ground_truth.strip(),
                                 candidate=answer)
        msgs = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
        reply = await self.caller.call(self.judge, "judge", msgs, _tag("judge", rec.id, n),
                                       rng, usage)
        if reply.error:
            return reply.error
        verdict = parse_verdict(reply.text)
        if verdict is None:
            return "unparsed"
        return "correct" if verdict else "incorrect"


def _tag(stage: str, pid: str, attempt: int) -> str:
    # Header values must be ASCII: the id is percent-encoded.
    return f"{stage}/{quote(pid, safe='')}/{attempt}"


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    result["usage"] = dict(sorted(result["usage"].items()))
    return result


# --------------------------------------------------------------------------- results log


class _ResultsLog:
    """Append-only, fsync'd, one-line-per-problem log; a torn last line is cut on open."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self.dropped_partial_bytes = 0
        self.skipped_lines = 0
        self._load()
        new = not path.exists()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:
            _fsync_dir(path.parent)  # so the file's directory entry survives a crash too

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A kill during the write left a line without its newline: it never counted.
            self.dropped_partial_bytes = len(data) - end
            os.truncate(self.path, end)
            log.warning("%s: dropped a partial trailing line (%d bytes)", self.path,
                        self.dropped_partial_bytes)
        for line in data[:end].splitlines():
            obj = _parse_result_line(line)
            if obj is None or obj["id"] in self.done:
                self.skipped_lines += line.strip() != b""
                continue
            self.done[obj["id"]] = obj
        if self.skipped_lines:
            log.warning("%s: ignored %d unreadable or duplicate lines", self.path,
                        self.skipped_lines)

    def append(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # os.write may write less than asked; finish the line before fsync
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.done[obj["id"]] = obj

    def close(self) -> None:
        os.close(self.fd)


def _parse_result_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) \
            or obj.get("status") not in ("accepted", "rejected"):
        return None
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- pools


def quality_key(result: dict[str, Any]) -> tuple[int, int, str]:
    """Sort key of an accepted result, best first: (tier, response characters, id)."""
    if result.get("first_try") and result.get("accepted_by") == "rules":
        tier = 0
    else:
        tier = _TIERS[(bool(result.get("hinted")), result.get("accepted_by"))]
    return tier, len(result.get("response") or ""), result["id"]


def _alignment_count(n_accepted: int, share: float) -> int:
    """``round(share * n)`` (half up), at least 1 when ``share > 0`` and anything passed."""
    if n_accepted == 0 or share <= 0:
        return 0
    return min(n_accepted, max(1, math.floor(share * n_accepted + 0.5)))


def _demonstration(rec: Record, result: dict[str, Any], teacher_fields: bool) -> Record:
    messages = rec.messages
    if result.get("rewritten_question"):
        messages = _with_question(messages, result["rewritten_question"])
    response = result["response"]
    extra: dict[str, Any] = {}
    if teacher_fields:
        caption, cot = split_text(response)
        extra = {"teacher_caption": caption, "teacher_cot": cot, "teacher_response": response}
    if "split" in rec.extra:
        extra["split"] = rec.extra["split"]
    return Record(id=rec.id, messages=_demo_messages(messages), images=rec.images,
                  response=response, ground_truth=rec.ground_truth, task=rec.task,
                  extra=extra, source=rec.source, index=rec.index)


def _write_pools(records: dict[str, Record], results: list[dict[str, Any]], out: Path,
                 share: float) -> tuple[int, int]:
    """Write ``align.parquet`` (best ``share``) and ``sft.json`` (the rest); (n_sft, n_align)."""
    accepted = sorted((r for r in results if r["status"] == "accepted"), key=quality_key)
    k = _alignment_count(len(accepted), share)
    align = [_demonstration(records[r["id"]], r, True) for r in accepted[:k]]
    # The SFT pool in problem-file order, so the file does not depend on completion order.
    rest = {r["id"] for r in accepted[k:]}
    by_id = {r["id"]: r for r in accepted}
    sft = [_demonstration(rec, by_id[pid], False) for pid, rec in records.items() if pid in rest]
    tmp_parquet, tmp_json = out / "align.parquet.tmp", out / "sft.json.tmp"
    write_verl_parquet(align, tmp_parquet)
    write_sharegpt_json(sft, tmp_json)
    os.replace(tmp_parquet, out / "align.parquet")
    os.replace(tmp_json, out / "sft.json")
    return len(sft), len(align)


# --------------------------------------------------------------------------- report


def _rate(passed: int, checked: int) -> dict[str, Any]:
    return {"checked": checked, "passed": passed,
            "pass_rate": round(passed / checked, 4) if checked else None}


def _filter_stats(attempts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    n = len(attempts)
    call_fail = sum(a["outcome"].startswith("call_failed") or a["outcome"] == "truncated"
                    for a in attempts)
    fmt_fail = sum(a["outcome"] == "format" for a in attempts)
    checked = n - call_fail - fmt_fail
    accepted = [a for a in attempts if a["outcome"] == "accepted"]
    judged = sum(a.get("judge") is not None for a in attempts)
    correctness = _rate(len(accepted), checked)
    correctness.update(by_rules=sum(a["check"] == "rules" for a in accepted),
                       by_judge=sum(a["check"] == "judge" for a in accepted), judge_calls=judged)
    return {"truncation_or_call": _rate(n - call_fail, n),
            "format": _rate(n - call_fail - fmt_fail, n - call_fail),
            "correctness": correctness}


def _usage_stats(total: Counter) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    stages = sorted({k.split(".", 1)[1] for k in total if k.startswith("calls.")})
    by_stage = {s: {"calls": total[f"calls.{s}"], "prompt_tokens": total[f"prompt_tokens.{s}"],
                    "completion_tokens": total[f"completion_tokens.{s}"]} for s in stages}
    usage = {"calls": sum(v["calls"] for v in by_stage.values()),
             "prompt_tokens": sum(v["prompt_tokens"] for v in by_stage.values()),
             "completion_tokens": sum(v["completion_tokens"] for v in by_stage.values()),
             "by_stage": by_stage}
    errors = {k.split(".", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("errors.")}
    retries = {k.split(".", 1)[1]: v for k, v in sorted(total.items())
               if k.startswith("retries.")}
    return usage, errors, retries


def _build_report(out: Path, n_problems: int, results: list[dict[str, Any]], pools: tuple,
                  run: dict[str, Any], settings: dict[str, Any]) -> CurationReport:
    accepted = [r for r in results if r["status"] == "accepted"]
    rejected = [r for r in results if r["status"] == "rejected"]
    attempts = [a for r in results for a in r["attempts"]]
    hist: dict[str, dict[str, int]] = {"accepted": {}, "rejected": {}}
    for r in results:
        h = hist[r["status"]]
        key = str(len(r["attempts"]))
        h[key] = h.get(key, 0) + 1
    hist = {s: dict(sorted(h.items(), key=lambda kv: int(kv[0]))) for s, h in hist.items()}
    total: Counter = Counter()
    for r in results:
        total.update(r.get("usage", {}))
    usage, errors, retries = _usage_stats(total)
    disamb = Counter(r["disambiguation"] for r in results if r.get("disambiguation"))
    return CurationReport(
        out_dir=str(out), problems=n_problems, finished=len(results), accepted=len(accepted),
        rejected=len(rejected), sft=pools[0], alignment=pools[1],
        accepted_by=dict(Counter(r["accepted_by"] for r in accepted)),
        filters=_filter_stats(attempts), attempts_histogram=hist,
        rejection_reasons={"final": dict(Counter(r["reason"] for r in rejected).most_common()),
                           "per_attempt": dict(Counter(a["outcome"] for a in attempts
                                                       if a["outcome"] != "accepted")
                                               .most_common())},
        hint_resubmissions=sum(a["hint"] for a in attempts),
        disambiguation=dict(disamb), usage=usage, errors_by_cause=errors,
        retries_by_cause=retries, run=run, settings=settings)


# --------------------------------------------------------------------------- driver


def _load_problems(path: str | Path) -> dict[str, Record]:
    records = read_records(path)
    by_id: dict[str, Record] = {}
    for rec in records:
        if rec.id in by_id:
            # Resume works by id, so two problems with one id would shadow each other.
            raise DataError(f"{rec.where('id')}: duplicate problem id {rec.id!r}")
        by_id[rec.id] = rec
    return by_id


async def _run_all(pending: list[Record], solver: _Solver, results: _ResultsLog,
                   concurrency: int, run_usage: Counter) -> int:
    """Solve ``pending`` with ``concurrency`` workers; each result is logged as it finishes."""
    from tqdm import tqdm

    queue = list(reversed(pending))
    bar = tqdm(total=len(pending), desc="curate", unit="problem", disable=None)
    finished = 0

    async def worker() -> None:
        nonlocal finished
        while queue:
            rec = queue.pop()
            result = await solver.solve(rec)
            results.append(result)
            run_usage.update(result["usage"])
            finished += 1
            bar.update(1)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        if tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await solver.caller.close()
    return finished


def curate(problems_path: str | Path, out_dir: str | Path, *, teacher: Endpoint,
           judge: Endpoint | None, disambiguate: bool = False, max_attempts: int = 3,
           concurrency: int = 8, timeout_s: float = 60, max_retries: int = 5,
           backoff_base_s: float = 0.5, max_tokens: int = 2048,
           alignment_share: float = 0.05, seed: int = 0) -> CurationReport:
    """Curate teacher demonstrations for ``problems_path`` into ``out_dir`` (see module).

    Resumable: rerunning with the same ``out_dir`` skips problems already in
    ``results.jsonl``. Raises :class:`CurationError` when the endpoints cannot be used and
    ``DataError`` for a bad problem file; both leave finished results in place.
    """
    if max_attempts < 1 or concurrency < 1 or max_retries < 0:
        raise ValueError("max_attempts and concurrency must be >= 1, max_retries >= 0")
    if not 0 <= alignment_share <= 1:
        raise ValueError(f"alignment_share must be in [0, 1], got {alignment_share}")
    for ep in (teacher, judge):
        if ep is not None:
            ep.api_key()  # fail before any work when a key variable is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = _load_problems(problems_path)
    results = _ResultsLog(out / RESULTS_FILE)
    pending = [rec for pid, rec in problems.items() if pid not in results.done]
    caller = _Caller(timeout_s=timeout_s, max_retries=max_retries,
                     backoff_base_s=backoff_base_s, max_tokens=max_tokens)
    solver = _Solver(caller, teacher, judge, disambiguate=disambiguate,
                     max_attempts=max_attempts, seed=seed)
    resumed = len(problems) - len(pending)
    if resumed:
        log.info("resuming: %d of %d problems already finished", resumed, len(problems))
    run_usage: Counter = Counter()
    t0 = time.monotonic()
    try:
        finished = asyncio.run(_run_all(pending, solver, results, concurrency, run_usage))
    finally:
        results.close()
    wall = time.monotonic() - t0

    done = [results.done[pid] for pid in problems if pid in results.done]
    unknown = len(results.done) - len(done)
    if unknown:
        log.warning("%s: %d results are for ids not in %s; ignored", out / RESULTS_FILE,
                    unknown, problems_path)
    pools = _write_pools(problems, done, out, alignment_share)
    run_u, run_errors, run_retries = _usage_stats(run_usage)
    run = {"wall_s": round(wall, 3), "problems_this_run": finished, "resumed_skipped": resumed,
           "problems_per_min": round(finished / wall * 60, 2) if wall > 0 else None,
           "calls": run_u["calls"], "errors_by_cause": run_errors,
           "retries_by_cause": run_retries,
           "dropped_partial_bytes": results.dropped_partial_bytes,
           "ignored_result_lines": results.skipped_lines + unknown}
    settings = {"problems_path": str(problems_path), "teacher": asdict(teacher),
                "judge": asdict(judge) if judge else None, "disambiguate": disambiguate,
                "max_attempts": max_attempts, "concurrency": concurrency,
                "timeout_s": timeout_s, "max_retries": max_retries,
                "backoff_base_s": backoff_base_s, "max_tokens": max_tokens,
                "alignment_share": alignment_share, "seed": seed}
    report = _build_report(out, len(problems), done, pools, run, settings)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.json")
    return report
