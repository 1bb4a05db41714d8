"""An optional LLM judge for answers the rules call wrong (METHOD.md section 8).

The paper consults a local 32B instruct model only when the rule-based check says an answer
is wrong. :class:`Judge` talks to any OpenAI-compatible chat endpoint (vLLM, SGLang, an
OpenAI-style gateway) through the official ``openai`` client: a short prompt with the
question, the reference answer and the model's final answer, asking for one word. For a
benchmark, question and reference are what the benchmark's own judge is shown
(``benchmark_scoring.judge_input``; docs/BENCHMARKS.md).

Failures never stop an evaluation: a timeout, a connection or HTTP error, or a reply with no
recognisable verdict gives a :class:`JudgeResult` with ``verdict=None`` and a reason, which
the evaluation counts as "not judged". The API key is read from an environment variable
(``PRISM_JUDGE_API_KEY`` by default; local servers accept a placeholder) and never appears
in results, errors or the judge's ``repr``.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["DEFAULT_API_KEY_ENV", "Judge", "JudgeResult", "build_messages", "parse_verdict"]

DEFAULT_API_KEY_ENV = "PRISM_JUDGE_API_KEY"
MAX_QUESTION_CHARS = 6000
MAX_ANSWER_CHARS = 2000

SYSTEM = ("You grade a student's final answer against the reference answer of an exam "
          "question. Reply with exactly one word: correct or incorrect.")
TEMPLATE = (
    "Question:\n{question}\n\n"
    "Reference answer: {reference}\n"
    "Student's final answer: {answer}\n\n"
    "Is the student's final answer equivalent to the reference answer? Equivalent forms count "
    "as correct: the matching option letter or the option's text, the same number written "
    "differently, the same value with units. Reply with exactly one word: correct or incorrect."
)

_POSITIVE = {"correct", "right", "true", "yes", "equivalent", "consistent", "same"}
_NEGATIVE = {"incorrect", "wrong", "false", "no", "inequivalent", "inconsistent", "different",
             "not", "isn't", "isnt"}
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def build_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat messages sent to the judge (long fields are cut)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TEMPLATE.format(
            question=question.strip()[:MAX_QUESTION_CHARS] or "(not given)",
            reference=reference.strip(), answer=answer.strip()[:MAX_ANSWER_CHARS])},
    ]


def parse_verdict(text: str | None) -> bool | None:
    """``True``/``False`` from the judge's reply, ``None`` when it has no verdict.

    The first verdict word decides ("Correct.", "**Incorrect**", "The answer is correct",
    "not correct" -> False); a reasoning model's ``<think>...</think>`` block is ignored, and
    a reply that is only ``1``/``0`` counts too.
    """
    if not text:
        return None
    text = _THINK_RE.sub(" ", text)
    if "<think>" in text.lower():  # an unfinished thought has no verdict
        return None
    stripped = text.strip().strip("*.`'\" ").lower()
    if stripped in ("1", "0"):
        return stripped == "1"
    for word in re.findall(r"[a-z']+", text.lower()):
        if word in _NEGATIVE:
            return False
        if word in _POSITIVE:
            return True
    return None


@dataclass(frozen=True)
class JudgeResult:
    """One judgement: ``verdict`` (``None`` = not judged), the raw reply, or the error."""

    verdict: bool | None
    raw: str = ""
    error: str | None = None
    request_failed: bool = False

    @property
    def status(self) -> str:
        """``correct``, ``incorrect``, ``error`` (the request failed) or ``unparsed``."""
        if self.verdict is not None:
            return "correct" if self.verdict else "incorrect"
        return "error" if self.request_failed else "unparsed"


class Judge:
    """An OpenAI-compatible chat model that says whether an answer matches the reference.

    ``judge`` asks about one answer; ``judge_many`` about several at once (``workers``
    threads). ``calls`` and ``failures`` count requests and not-judged outcomes.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = DEFAULT_API_KEY_ENV,
                 timeout: float = 60.0, *, max_tokens: int = 16, max_retries: int = 1,
                 workers: int = 8, temperature: float = 0.0):
        from openai import OpenAI

        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.workers = max(1, workers)
        self._secret = os.environ.get(api_key_env) or None
        # local servers accept any key; the openai client insists on having one
        self._client = OpenAI(base_url=base_url, api_key=self._secret or "EMPTY",
                              timeout=timeout, max_retries=max_retries)
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"Judge(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, message: str) -> str:
        if self._secret:
            message = message.replace(self._secret, "***")
        return message[:300]

    def _count(self, failed: bool) -> None:
        with self._lock:
            self.calls += 1
            self.failures += failed

    def judge(self, question: str, reference: str, answer: str) -> JudgeResult:
        """Ask once; never raises (errors come back as a result with ``error`` set)."""
        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=build_messages(question, reference, answer),
                max_tokens=self.max_tokens, temperature=self.temperature)
            raw = (resp.choices[0].message.content or "") if resp.choices else ""
        except Exception as e:  # noqa: BLE001 - any failure means "not judged"
            self._count(True)
            return JudgeResult(None, "", self._redact(f"{type(e).__name__}: {e}"), True)
        verdict = parse_verdict(raw)
        self._count(verdict is None)
        error = None if verdict is not None else f"no verdict in reply {raw[:80]!r}"
        return JudgeResult(verdict, raw, error)

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[JudgeResult]:
        """``judge`` over ``(question, reference, answer)`` items, in order, in parallel."""
        if len(items) <= 1 or self.workers == 1:
            return [self.judge(*it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(lambda it: self.judge(*it), items))
