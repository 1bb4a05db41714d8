"""The PRISM response format: ``<caption>`` / ``<think>`` / ``<answer>``.

Every demonstration and every rollout is::

    <caption>
    - bullet points: image style, key objects, text in the image
    </caption>
    <think>
    step-by-step reasoning
    </think>
    <answer>
    final answer only
    </answer>

This module holds the system prompt that asks for it, the reference whole-response regex,
a parser, a strict validator (all three parts non-empty, as curation requires), answer
extraction, and the token-level split of a response into its caption segment and its
reasoning segment (what the discriminator scores separately).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a helpful scientific assistant. Answer the user's question from the image. "
    "Your output must follow exactly this XML format:\n"
    "<caption>\n"
    "- bullet points: image style, key objects, text in the image\n"
    "</caption>\n"
    "<think>\n"
    "step-by-step reasoning\n"
    "</think>\n"
    "<answer>\n"
    "final answer only\n"
    "</answer>"
)

# The reference implementation's check: the whole decoded text, end to end, DOTALL.
FORMAT_RE = re.compile(
    r"^\s*<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$",
    re.DOTALL,
)
CAPTION_END = "</caption>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_LEAD_RE = re.compile(r"\s*<caption>")
_CAPTION_THINK_RE = re.compile(r"</caption>\s*<think>")
_THINK_ANSWER_RE = re.compile(r"</think>\s*<answer>")
_TAIL_RE = re.compile(r"</answer>\s*\Z")


def format_matches(text: str) -> bool:
    r"""Linear-time test equivalent to ``FORMAT_RE.match(text) is not None``.

    The reference regex backtracks cubically on tag soup (a degenerate rollout repeating all
    six tags: 20k characters took ~10 s), so every caller runs it only on texts that pass
    this test. After leading white space and ``<caption>``, take the earliest
    ``</caption>\s*<think>``, then the earliest ``</think>\s*<answer>`` after it, then require
    a ``</answer>`` followed only by white space. Taking the earliest candidate at each step
    is optimal (a later start only removes options), so exactly the regex's strings pass.
    """
    m = _LEAD_RE.match(text)
    if m is None:
        return False
    c = _CAPTION_THINK_RE.search(text, m.end())
    if c is None:
        return False
    d = _THINK_ANSWER_RE.search(text, c.end())
    return d is not None and _TAIL_RE.search(text, d.end()) is not None


def _match(text: str) -> re.Match | None:
    return FORMAT_RE.match(text) if format_matches(text) else None


@dataclass(frozen=True)
class ParsedResponse:
    """The three parts of a format-valid response, stripped of surrounding white space."""

    caption: str
    think: str
    answer: str

    @property
    def complete(self) -> bool:
        """True when every part is non-empty (the curation filter's requirement)."""
        return bool(self.caption and self.think and self.answer)


def parse_response(text: str) -> ParsedResponse | None:
    """Parse ``text`` with the reference regex; ``None`` when it does not match end to end."""
    m = _match(text)
    if m is None:
        return None
    return ParsedResponse(*(part.strip() for part in m.groups()))


def is_format_valid(text: str, strict: bool = False) -> bool:
    """Reference validity (whole-text regex); ``strict`` also requires non-empty parts."""
    parsed = parse_response(text)
    if parsed is None:
        return False
    return parsed.complete if strict else True


def extract_answer(text: str) -> str | None:
    """Content of the last closed ``<answer>...</answer>`` block, stripped; ``None`` if none.

    Lenient on purpose: evaluation reads the answer even from a response whose other parts
    are malformed; the format score is computed separately by :func:`is_format_valid`.

    The blocks are those of ``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)``: from
    the first ``<answer>``, up to the first ``</answer>`` after it, then on from there. Found
    with ``str.find`` in one pass: the regex retries from every later ``<answer>`` once no
    ``</answer>`` is left, which is quadratic on a rollout repeating ``<answer>``.
    """
    found, pos = None, 0
    while (start := text.find(ANSWER_OPEN, pos)) >= 0:
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break
        found, pos = text[start + len(ANSWER_OPEN):end], end + len(ANSWER_CLOSE)
    return None if found is None else found.strip()


def make_response(caption: str, think: str, answer: str) -> str:
    """Render the three parts in the canonical layout (one tag per line)."""
    return (
        f"<caption>\n{caption.strip()}\n</caption>\n"
        f"<think>\n{think.strip()}\n</think>\n"
        f"<answer>\n{answer.strip()}\n</answer>"
    )


def caption_end(text: str) -> int | None:
    r"""Character offset just past the ``</caption>`` that closes the format's caption part.

    That is the end of the reference regex's first group plus ``len("</caption>")``: the first
    ``</caption>`` followed by ``\s*<think>`` (``<caption>a</caption> b</caption>\n<think>...``
    ends its caption after the *second* tag; a stray earlier ``</caption>`` is caption text).
    ``None`` for a format-invalid response.
    """
    m = _match(text)
    return None if m is None else m.end(1) + len(CAPTION_END)


def split_text(text: str) -> tuple[str, str] | None:
    """Split a format-valid response into (caption segment, reasoning segment) as text.

    The caption segment ends at :func:`caption_end`; the reasoning segment is the rest (the
    white space before ``<think>``, think and answer). ``None`` for a format-invalid response.
    """
    cut = caption_end(text)
    return None if cut is None else (text[:cut], text[cut:])


def caption_token_end(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int | None:
    """Number of leading tokens that form the caption segment of a generated response.

    With ``text = decode(token_ids)`` and ``c = caption_end(text)``, returns the smallest
    ``k`` such that ``decode(token_ids[:k])`` starts with ``text[:c]``: tokens ``[0, k)`` are
    the caption segment, ``[k, len)`` the reasoning segment (think, answer, end of sequence).
    The token that completes ``</caption>`` belongs to the caption (with whatever white space
    a tokenizer merged into it). ``None`` if ``text`` does not match the format regex.

    Having the complete prefix is monotone in ``k`` (a token never changes the text decoded
    before it once that text's bytes are complete), so a binary search needs ``O(log n)``
    decodes, for any tokenizer and wherever its token boundaries fall.
    """
    full = decode(token_ids)
    cut = caption_end(full)
    if cut is None:
        return None
    prefix = full[:cut]
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(token_ids[:mid]).startswith(prefix):
            hi = mid
        else:
            lo = mid + 1
    return lo
