"""The verifiable reward of PRISM's RLVR stage (spec section 7).

Score of one rollout::

    format-invalid (whole-text regex of ``prism_rl.format``)    -> 0.0
    valid, empty <answer> or an answer of >= 1024 characters      -> format_weight (0.2)
    otherwise                                                     -> 0.8 * acc + 0.2 * 1

Accuracy (0 or 1) is rule-based on the ``<answer>`` content. The rules run in this order and
the first one that can decide does:

1. multiple-choice letters (``B``, ``(B)``, ``B.``, ``The answer is B``, ``Answer: (B) 30``);
2. exact match after light normalisation (wrappers, white space, case, final period);
3. numbers within relative error 1e-6 (thousands separators, unicode minus, currency,
   trailing units and percent handled);
4. normalised text and LaTeX (``\\frac``, ``\\text``, ``^\\circ``, delimiters, ``\\boxed`` ...);
5. multi-value answers, compared as unordered multisets;
6. coordinate tuples, compared in order with numeric tolerance;
7. ``math_verify`` (symbolic equivalence) as the fallback.

Every check is bounded in time. Rules 1-6 are linear-time string work on an answer capped
at ``max_answer_chars``. The fallback never runs in the calling process: it runs in a small,
lazily started pool of reusable worker processes (``python -c`` children that import only
``math_verify``), each call under a soft deadline (``setitimer`` inside the worker, whose
main thread owns the signal) and a hard one (the caller stops waiting and kills the worker;
a fresh one is started in the background). So it is safe from any thread, and a pathological
answer costs at most ``timeout_s`` (+ a 1 s grace) and scores accuracy 0 with
``reason="timeout"``. Answers that rules settle never touch the pool.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TextIO

from prism_rl.format import extract_answer, format_matches, is_format_valid, parse_response

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "RewardInputError",
    "RewardResult",
    "Verdict",
    "batch_scores",
    "check_answer",
    "close_math_verify_workers",
    "compute_score",
    "is_correct",
    "load_reward_fn",
    "score_jsonl",
]

logger = logging.getLogger(__name__)

ACC_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2
MAX_ANSWER_CHARS = 1024
DEFAULT_TIMEOUT_S = 3.0
HARD_TIMEOUT_GRACE_S = 1.0
WORKER_STARTUP_TIMEOUT_S = 60.0
REL_TOL = 1e-6
MAX_NESTING = 40
MAX_POWER_DIGITS = 100_000
MAX_ITEMS = 64
MAX_MATH_VERIFY_WORKERS = max(1, min(4, os.cpu_count() or 1))
_CACHE_SIZE = 8192


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardResult:
    """One scored rollout: ``score = acc_weight * acc + format_weight * format`` (see module)."""

    score: float
    acc: float
    format: float
    answer: str | None
    reason: str


class Verdict(NamedTuple):
    """Outcome of the accuracy check: ``correct`` and which rule decided (``reason``)."""

    correct: bool
    reason: str


class RewardInputError(ValueError):
    """Bad reward input; the message names the file, the line number and the field."""


# ---------------------------------------------------------------------------------------------
# Fast, exact format check
# ---------------------------------------------------------------------------------------------

# Linear-time equivalent of the reference format regex (see prism_rl.format.format_matches).
_format_prefilter = format_matches


def _format_ok(text: str) -> bool:
    """Format validity: the reference ``is_format_valid``, behind the linear prefilter."""
    return is_format_valid(text)  # is_format_valid runs the linear check first


# ---------------------------------------------------------------------------------------------
# String helpers
# ---------------------------------------------------------------------------------------------

_OPEN_TO_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _matching_close(s: str, i: int) -> int | None:
    """Index of the bracket closing the one at ``s[i]`` (any of ``([{``); ``None`` if none."""
    depth = 0
    for j in range(i, len(s)):
        ch = s[j]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return j
            if depth < 0:
                return None
    return None


def _max_nesting(s: str) -> int:
    """Deepest bracket nesting of ``s`` counting ``()``, ``[]`` and ``{}`` alike."""
    depth = best = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            best = max(best, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return best


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """The LaTeX argument starting at ``s[i]`` (after spaces): ``{...}`` or one character.

    Returns ``(content, index after it)``; ``None`` at the end of the string or on an
    unbalanced group.
    """
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        j = _matching_close(s, i)
        if j is None:
            return None
        return s[i + 1 : j], j + 1
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _split_top_level(s: str) -> list[str]:
    """Split ``s`` at commas and semicolons outside every bracket; items are stripped."""
    items, depth, start = [], 0, 0
    for j, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch in ",;" and depth == 0:
            items.append(s[start:j].strip())
            start = j + 1
    items.append(s[start:].strip())
    return items


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_LEAD_IN_RE = re.compile(
    r"^(?:(?:so|thus|hence|therefore),?\s+)?(?:the\s+)?(?:final\s+|correct\s+)?"
    r"(?:answer|option|choice)\b(?:\s+is)?\s*[:=]?\s*",
    re.IGNORECASE,
)
_DELIMITERS = (
    re.compile(r"^\$\$(.+)\$\$$", re.DOTALL),
    re.compile(r"^\$([^$]+)\$$", re.DOTALL),
    re.compile(r"^\\\((.+)\\\)$", re.DOTALL),
    re.compile(r"^\\\[(.+)\\\]$", re.DOTALL),
    re.compile(r"^\*\*(.+)\*\*$", re.DOTALL),
)
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\uff0d": "-", "\ufe63": "-"})


def _last_boxed(s: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``s``; ``None`` if none."""
    k = max(s.rfind("\\boxed"), s.rfind("\\fbox"))
    if k < 0:
        return None
    i = s.find("{", k)
    if i < 0 or s[k:i].strip() not in ("\\boxed", "\\fbox"):
        return None
    j = _matching_close(s, i)
    return None if j is None else s[i + 1 : j]


def _strip_wrappers(s: str) -> str:
    """Remove what surrounds the answer itself, repeatedly (at most 8 rounds).

    Rules: outer white space; lead-ins ("The answer is", "Answer:", "Option", "So the final
    answer is"), markdown ``**...**``, ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``;
    the content of the last ``\\boxed{...}`` when there is one; one final period (not an
    ellipsis).
    """
    s = s.strip()
    for _ in range(8):
        before = s
        m = _LEAD_IN_RE.match(s)
        if m and m.end() < len(s):
            s = s[m.end() :].strip()
        for pat in _DELIMITERS:
            m = pat.match(s)
            if m:
                s = m.group(1).strip()
        boxed = _last_boxed(s)
        if boxed is not None:
            s = boxed.strip()
        if s.endswith(".") and not s.endswith("..") and len(s) > 1:
            s = s[:-1].rstrip()
        if s == before:
            break
    return s


def _light(s: str) -> str:
    """Light normalisation for exact match: wrappers, unicode minus, white space, case."""
    return " ".join(_strip_wrappers(s).translate(_MINUS).split()).casefold()


_UNWRAP_CMDS = ("text", "mathrm", "textbf", "mathbf", "textit", "mathit", "mbox", "operatorname", "textrm")
_UNWRAP_RE = re.compile(r"\\(?:" + "|".join(_UNWRAP_CMDS) + r")\s*\{")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree")
_ATOMIC_RE = re.compile(r"-?[\w.]+|\\[A-Za-z]+")


def _unwrap_commands(s: str) -> str:
    """``\\text{x}``, ``\\mathrm{x}`` and similar become ``x`` (all occurrences)."""
    for _ in range(len(s)):
        m = _UNWRAP_RE.search(s)
        if m is None:
            break
        j = _matching_close(s, m.end() - 1)
        if j is None:
            break
        s = s[: m.start()] + s[m.end() : j] + s[j + 1 :]
    return s


def _paren(x: str) -> str:
    """``x`` unchanged when atomic (a number, a word, a command), else ``(x)``."""
    return x if _ATOMIC_RE.fullmatch(x) else f"({x})"


def _replace_fracs(s: str) -> str:
    """``\\frac{a}{b}`` (and ``\\frac12``) becomes ``a/b``, parenthesising non-atomic parts.

    ``\\dfrac``/``\\tfrac`` are turned into ``\\frac`` first. Nested fractions are handled
    by recursion on the arguments (nesting is bounded by the caller's depth guard).
    """
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out, i = [], 0
    while True:
        k = s.find("\\frac", i)
        if k < 0 or s[k + 5 : k + 6].isalpha():
            if k < 0:
                out.append(s[i:])
                return "".join(out)
            out.append(s[i : k + 5])
            i = k + 5
            continue
        num = _brace_arg(s, k + 5)
        den = _brace_arg(s, num[1]) if num else None
        if num is None or den is None:
            out.append(s[i:])
            return "".join(out)
        a, b = _replace_fracs(num[0]).strip(), _replace_fracs(den[0]).strip()
        out.append(s[i:k] + f"{_paren(a)}/{_paren(b)}")
        i = den[1]


@functools.lru_cache(maxsize=4096)
def _plain(s: str) -> str:
    """LaTeX-to-plain normalisation, keeping single spaces (used by numbers and units).

    Rules: wrappers stripped; ``\\left``/``\\right``/sizing removed; spacing commands become
    spaces; ``\\text``/``\\mathrm``/... unwrapped; ``\\frac{a}{b}`` -> ``a/b``; ``^\\circ``,
    ``^{\\circ}``, ``\\circ``, ``\\degree`` -> ``°``; ``\\%`` -> ``%``; ``\\$`` -> ``$``;
    ``\\cdot``/``\\times``/``×``/``·`` -> ``*``; ``π`` -> ``\\pi``; ``x^{2}`` -> ``x^2``;
    unicode minus -> ``-``; white space collapsed; lower case.
    """
    s = _strip_wrappers(s)
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = _SIZING_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = _unwrap_commands(s)
    s = _replace_fracs(s)
    s = _DEGREE_RE.sub("°", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("π", "\\pi")
    s = re.sub(r"\\cdot(?![A-Za-z])|\\times(?![A-Za-z])|×|·", "*", s)
    s = re.sub(r"([\^_])\{\s*([^{}\s])\s*\}", r"\1\2", s)
    s = s.translate(_MINUS)
    s = _strip_wrappers(s)
    return " ".join(s.split()).casefold()


def _norm(s: str) -> str:
    """Full normalisation for the text rule: :func:`_plain`, no ``°``, no white space."""
    return "".join(_plain(s).replace("°", "").split())


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:e[-+]?\d+)?|[-+]?\.\d+(?:e[-+]?\d+)?"
_UNIT_WORDS = (
    "mm cm dm km in inch inches ft feet foot yd yard yards mi mile miles meter meters metre "
    "metres centimeter centimeters centimetre centimetres millimeter millimeters kilometer "
    "kilometers mg kg gram grams kilogram kilograms lb lbs pound pounds oz ton tons ml "
    "liter liters litre litres sec secs second seconds min mins minute minutes hr hrs hour "
    "hours day days week weeks month months year years deg degree degrees rad radian radians "
    "unit units dollar dollars cent cents yuan euro euros rmb kn pa kpa kj kw hz ohm ohms mph kph"
).split()
_UNIT_LETTERS = ("m", "g", "s", "h", "l")  # only after a space: "5m" may be 5 * m


def _alternation(words: Iterable[str]) -> str:
    """Regex alternation of ``words``, longest first, each with an optional ^2/^3/²/³."""
    return r"(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")(?:\^?[23]|[²³])?"


_ANY_UNIT = _alternation((*_UNIT_WORDS, *_UNIT_LETTERS, "ω"))
_UNIT = (
    rf"(?:\s*(?:(?:sq\.?|square|cubic)\s+)?(?:{_alternation(_UNIT_WORDS)}|ω)(?:\s*/\s*{_ANY_UNIT})?"
    rf"|\s+{_alternation(_UNIT_LETTERS)}(?:\s*/\s*{_ANY_UNIT})?"
    r"|\s*°[cf]?)"
)
_NUMBER_RE = re.compile(rf"(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?{_UNIT}?")


def _to_float(text: str) -> float | None:
    """``float`` of a matched number literal without thousands separators; ``None`` if not finite."""
    try:
        x = float(text.replace(",", ""))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _parse_number(s: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when ``s`` is one number, else ``None``.

    Accepted: ``1,234`` (groups of exactly three digits), ``-3.5``, ``1e-3``, ``.5``, ``3/4``,
    ``\\frac{3}{4}``, unicode minus, a leading currency sign (``$3``), outer parentheses, a
    trailing ``%`` / ``percent`` (flagged), and one trailing known unit (``12 cm``, ``45°``,
    ``5 m^2``, ``3 m/s``, ``7 square units``). Non-finite values are not numbers.
    """
    t = _plain(s)
    if len(t) > 2 and t[0] == "(" and _matching_close(t, 0) == len(t) - 1:
        t = t[1:-1].strip()
    t = re.sub(r"^([-+]?)\s*[$€£¥]\s*", r"\1", t)
    pct = False
    if t.endswith("%"):
        t, pct = t[:-1].rstrip(), True
    elif t.endswith(" percent"):
        t, pct = t[: -len(" percent")].rstrip(), True
    m = _NUMBER_RE.fullmatch(t)
    if m is None:
        return None
    value = _to_float(m.group("num"))
    if value is None:
        return None
    if m.group("den") is not None:
        den = _to_float(m.group("den"))
        if not den:
            return None
        value /= den
    return value, pct


def _close(a: float, g: float) -> bool:
    """Numbers agree: ``|a - g| <= 1e-6 * |g|`` (so a ground truth of 0 needs exactly 0)."""
    return a == g or abs(a - g) <= REL_TOL * abs(g)


def _numbers_equal(a: tuple[float, bool], g: tuple[float, bool]) -> bool:
    """Compare two parsed numbers; a ``%`` on either side lets it match ``v`` or ``v / 100``.

    So ``50%`` equals ``50`` and ``0.5``; ``0.5`` without a percent sign does not equal ``50``.
    """
    av = {a[0], a[0] / 100} if a[1] else {a[0]}
    gv = {g[0], g[0] / 100} if g[1] else {g[0]}
    return any(_close(x, y) for x in av for y in gv)


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

_GT_LETTER_RE = re.compile(r"\(?([A-Z])\)?[.:]?")
_LETTER_VALUE_RE = re.compile(r"\(([A-Z])\)\s*(.+)|([A-Z])\)\s*(.+)|([A-Z])[.:]\s+(.+)", re.DOTALL)
_ANSWER_LOWER_RE = re.compile(r"\(([a-z])\)[.:]?")


def _parse_choice(s: str, *, answer: bool) -> tuple[str, str | None] | None:
    """``(letter, value or None)`` for a multiple-choice form, else ``None``.

    Forms: ``B``, ``(B)``, ``B.``, ``B)``, ``B:``; with a value ``(A) 30``, ``A) 30``,
    ``C. 12 cm``, ``A: 30``. Letters are upper case; an answer may also use ``(b)``.
    Lead-ins such as "The answer is" were stripped by :func:`_strip_wrappers`.
    """
    m = _GT_LETTER_RE.fullmatch(s)
    if m:
        return m.group(1), None
    if answer:
        m = _ANSWER_LOWER_RE.fullmatch(s)
        if m:
            return m.group(1).upper(), None
    m = _LETTER_VALUE_RE.fullmatch(s)
    if m:
        letter = m.group(1) or m.group(3) or m.group(5)
        value = (m.group(2) or m.group(4) or m.group(6)).strip()
        return letter, value or None
    return None


_ASSIGN_RE = re.compile(r"(?:[A-Za-z](?:_\{?\w+\}?)?|[A-Za-z]{2,3})\s*=\s*(?P<rhs>[^=]+)")


def _drop_assignment(a: str, g: str) -> str:
    """``x = 2`` -> ``2`` (also ``AB = 5``, ``x_1 = 3``) when the ground truth has no ``=``."""
    if "=" in g:
        return a
    m = _ASSIGN_RE.fullmatch(a)
    return m.group("rhs").strip() if m else a


def _atoms_equal(a: str, g: str) -> bool:
    """Element equality used inside lists and tuples: exact, number, or normalised text."""
    if _light(a) == _light(g):
        return True
    na, ng = _parse_number(a), _parse_number(g)
    if na is not None and ng is not None:
        return _numbers_equal(na, ng)
    return _norm(a) == _norm(g)


def _rule_exact(a: str, g: str) -> Verdict | None:
    """Equal after light normalisation -> correct."""
    return Verdict(True, "match:exact") if _light(a) == _light(g) else None


def _rule_number(a: str, g: str) -> Verdict | None:
    """Both sides one number -> correct iff within relative error 1e-6 (settles both ways)."""
    na, ng = _parse_number(a), _parse_number(g)
    if na is None or ng is None:
        return None
    if _numbers_equal(na, ng):
        return Verdict(True, "match:number")
    return Verdict(False, "mismatch:number")


def _rule_text(a: str, g: str) -> Verdict | None:
    """Equal after full text/LaTeX normalisation -> correct."""
    return Verdict(True, "match:text") if _norm(a) == _norm(g) else None


def _set_items(s: str) -> list[str] | None:
    """Items of a multi-value answer: ``2, 3``, ``2; 3``, ``\\{2, 3\\}``, ``{2, 3}``.

    ``None`` for one value, for a tuple wrapped in ``()``/``[]``, or past ``MAX_ITEMS``.
    """
    s = _plain(s)
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2].strip()
    elif s.startswith("{") and _matching_close(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    elif s[:1] in "([" and _matching_close(s, 0) == len(s) - 1:
        return None
    items = _split_top_level(s)
    if len(items) < 2 or len(items) > MAX_ITEMS or not all(items):
        return None
    return items


def _all_numbers(items: Iterable[str]) -> bool:
    """Every item parses as one number."""
    return all(_parse_number(x) is not None for x in items)


def _rule_list(a: str, g: str) -> Verdict | None:
    """A multi-value ground truth matches when the answer has the same multiset of values.

    Pairing is greedy with :func:`_atoms_equal`. A mismatch settles (wrong) only when every
    item on both sides is a plain number; otherwise the fallback gets a chance.
    """
    gi = _set_items(g)
    if gi is None:
        return None
    ai = _set_items(a) or [_plain(a)]
    if len(ai) == len(gi):
        left = list(ai)
        for x in gi:
            hit = next((k for k, y in enumerate(left) if _atoms_equal(y, x)), None)
            if hit is None:
                break
            left.pop(hit)
        else:
            return Verdict(True, "match:list")
    if _all_numbers(gi) and _all_numbers(ai):
        return Verdict(False, "mismatch:list")
    return None


def _tuple_parts(s: str) -> tuple[str, list[str]] | None:
    """``(brackets, items)`` for ``(1, 2)`` / ``[1, 2]`` with at least two items, else ``None``."""
    s = _plain(s)
    if s[:1] not in "([" or _matching_close(s, 0) != len(s) - 1:
        return None
    items = _split_top_level(s[1:-1])
    if len(items) < 2 or len(items) > MAX_ITEMS or not all(items):
        return None
    return s[0] + s[-1], items


def _rule_tuple(a: str, g: str) -> Verdict | None:
    """A coordinate tuple matches item by item, in order, with numeric tolerance.

    The brackets must agree (``(1, 2)`` vs ``[1, 2]`` may be intervals: left to the fallback);
    an unwrapped answer ``1, 2`` is read with the ground truth's brackets. A mismatch settles
    only when every item on both sides is a plain number.
    """
    gt = _tuple_parts(g)
    if gt is None:
        return None
    at = _tuple_parts(a)
    if at is None:
        items = _split_top_level(_plain(a))
        if len(items) != len(gt[1]):
            return None
        at = (gt[0], items)
    if at[0] != gt[0]:
        return None
    if len(at[1]) == len(gt[1]) and all(_atoms_equal(x, y) for x, y in zip(at[1], gt[1])):
        return Verdict(True, "match:tuple")
    if _all_numbers(gt[1]) and _all_numbers(at[1]):
        return Verdict(False, "mismatch:tuple")
    return None


_WORDS_RE = re.compile(r"[a-z][a-z' -]*")
_MATH_WORDS = frozenset(
    "pi sin cos tan cot sec csc log ln exp sqrt inf infty infinity arcsin arccos arctan".split()
)


def _rule_words(a: str, g: str) -> Verdict | None:
    """Two different plain-word answers (``yes`` vs ``no``) are wrong without the fallback.

    Applies when both sides are letters/spaces/hyphens/apostrophes only and some word has
    three or more letters and is not a math function name (so ``ab`` vs ``ba`` still goes to
    the fallback, where it is a product).
    """
    la, lg = _light(a), _light(g)
    if not (_WORDS_RE.fullmatch(la) and _WORDS_RE.fullmatch(lg)):
        return None
    words = re.findall(r"[a-z]+", la + " " + lg)
    if any(len(w) >= 3 and w not in _MATH_WORDS for w in words):
        return Verdict(False, "mismatch:text")
    return None


_TOWER_RE = re.compile(r"\d\s*\^\s*\{?\s*[\d.]+\s*\}?\s*\^|\d\s*\^\s*\{\s*[\d.]+\s*\^")
_POWER_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^|\*\*)\s*\{?\s*(\d{1,15})(?!\d)")


def _explosive(a: str) -> str | None:
    """Why ``a`` must not reach the symbolic fallback, or ``None``.

    Rules: bracket nesting deeper than ``MAX_NESTING``; a numeric power tower (``9^9^9``,
    ``2^{2^{30}}``); a numeric power with more than ``MAX_POWER_DIGITS`` digits
    (``exponent * log10(base)``).
    """
    if _max_nesting(a) > MAX_NESTING:
        return "rejected:nesting"
    if _TOWER_RE.search(a):
        return "rejected:power"
    for m in _POWER_RE.finditer(a):
        base, exp = float(m.group(1)), int(m.group(2))
        if base > 1 and exp * math.log10(base) > MAX_POWER_DIGITS:
            return "rejected:power"
    return None


# ---------------------------------------------------------------------------------------------
# math_verify fallback in worker processes
# ---------------------------------------------------------------------------------------------

# The worker imports only math_verify (never prism_rl, whose package may import heavy code).
# Its stdout is redirected to stderr (DEVNULL) so stray prints cannot corrupt the protocol.
_WORKER_SOURCE = r"""
import json, logging, os, signal, sys
out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
logging.disable(logging.CRITICAL)
from math_verify import parse, verify

class Deadline(BaseException):
    pass

def on_alarm(signum, frame):
    raise Deadline()

TIMER = hasattr(signal, "setitimer")
if TIMER:
    signal.signal(signal.SIGALRM, on_alarm)

def parse_any(s):
    got = parse("$" + s + "$", parsing_timeout=None)
    return got if got else parse(s, parsing_timeout=None)

def judge(pred, gold):
    g = parse_any(gold)
    p = parse_any(pred) if g else None
    if not g or not p:
        return "unparsed"
    return "true" if verify(g, p, timeout_seconds=None) else "false"

def run(req):
    try:
        if TIMER:
            signal.setitimer(signal.ITIMER_REAL, req["t"])
        try:
            return judge(req["a"], req["g"])
        finally:
            if TIMER:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:
        return "timeout"
    except Exception:
        return "error"

out.write('{"ready": true}\n')
for line in sys.stdin:
    req = json.loads(line)
    out.write(json.dumps({"id": req["id"], "r": run(req)}) + "\n")
"""

_HEALTHY = frozenset({"true", "false", "unparsed", "timeout"})


class _Worker:
    """One ``math_verify`` child process speaking JSON lines over stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready = False
        self.next_id = 0
        threading.Thread(target=self._pump, name="math-verify-reader", daemon=True).start()

    def _pump(self) -> None:
        """Move the child's output lines into ``self.lines``; ``None`` marks its end."""
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def _next(self, timeout: float) -> dict | None:
        """Next decoded message, or ``None`` on timeout or when the child has gone."""
        try:
            line = self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if line is None:
            self.lines.put(None)
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {}

    def ask(self, answer: str, gold: str, soft_s: float, hard_s: float) -> str:
        """Run one comparison: ``true``/``false``/``unparsed``/``timeout``/``hard_timeout``/``error``.

        The first call waits (up to ``WORKER_STARTUP_TIMEOUT_S``, not counted in the per-call
        deadline) for the child to finish importing ``math_verify``.
        """
        if not self.ready:
            msg = self._next(WORKER_STARTUP_TIMEOUT_S)
            if not msg or not msg.get("ready"):
                return "error"
            self.ready = True
        self.next_id += 1
        req = {"id": self.next_id, "a": answer, "g": gold, "t": soft_s}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            return "error"
        deadline = time.monotonic() + hard_s
        while True:
            msg = self._next(deadline - time.monotonic())
            if msg is None:
                return "hard_timeout" if self.proc.poll() is None else "error"
            if msg.get("id") == self.next_id:
                return str(msg.get("r"))

    def kill(self) -> None:
        """Terminate the child at once and reap it."""
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass


class _WorkerPool:
    """At most ``size`` workers, started on demand and reused; a failed one is replaced.

    Thread-safe: each call checks a worker out, so callers in several threads run in
    parallel up to ``size``. A worker that blew its hard deadline or died is killed and a
    replacement is started at once, so it imports ``math_verify`` in the background.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.idle: list[_Worker] = []
        self.count = 0
        self.cond = threading.Condition()
        self.closed = False

    def _acquire(self) -> _Worker:
        """An idle worker, a new one while fewer than ``size`` exist, else wait for one."""
        with self.cond:
            while not self.idle and self.count >= self.size:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        """Return ``worker`` to the idle list; an unhealthy one is killed and replaced."""
        if not healthy:
            worker.kill()
            try:
                worker = _Worker()
            except OSError:
                with self.cond:
                    self.count -= 1
                    self.cond.notify()
                return
        with self.cond:
            if self.closed:
                worker.kill()
                return
            self.idle.append(worker)
            self.cond.notify()

    def run(self, answer: str, gold: str, soft_s: float, hard_s: float) -> str:
        """Compare on a pooled worker; see :meth:`_Worker.ask` for the results."""
        worker = self._acquire()
        result = "error"
        try:
            result = worker.ask(answer, gold, soft_s, hard_s)
        finally:
            self._release(worker, result in _HEALTHY)
        return result

    def close(self) -> None:
        """Kill every idle worker; busy ones are killed when they come back."""
        with self.cond:
            self.closed = True
            idle, self.idle = self.idle, []
        for w in idle:
            w.kill()


_pool: _WorkerPool | None = None
_pool_lock = threading.Lock()
_cache: OrderedDict[tuple[str, str, float], str] = OrderedDict()
_cache_lock = threading.Lock()
_warned = False


def _get_pool() -> _WorkerPool:
    """The process-wide pool, created on first use (and afresh in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid() or _pool.closed:
            _pool = _WorkerPool(MAX_MATH_VERIFY_WORKERS)
        return _pool


def close_math_verify_workers() -> None:
    """Stop the fallback's worker processes (also run at exit); the next call restarts them."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(close_math_verify_workers)


def _math_verify(answer: str, gold: str, timeout_s: float) -> Verdict:
    """Symbolic fallback with a soft deadline ``timeout_s`` and a hard one 1 s later.

    Results are cached (LRU, ``_CACHE_SIZE`` entries, timeouts included) by
    ``(answer, gold, timeout_s)``: the 16 rollouts of a prompt often repeat an answer.
    """
    global _warned
    key = (answer, gold, float(timeout_s))
    with _cache_lock:
        result = _cache.get(key)
        if result is not None:
            _cache.move_to_end(key)
    if result is None:
        result = _get_pool().run(answer, gold, float(timeout_s), float(timeout_s) + HARD_TIMEOUT_GRACE_S)
        if result != "error":
            with _cache_lock:
                _cache[key] = result
                if len(_cache) > _CACHE_SIZE:
                    _cache.popitem(last=False)
    if result == "true":
        return Verdict(True, "match:math_verify")
    if result in ("timeout", "hard_timeout"):
        return Verdict(False, "timeout")
    if result == "error":
        if not _warned:
            _warned = True
            logger.warning(
                "math-verify worker failed (is math_verify importable by %s?); scoring 0", sys.executable
            )
        return Verdict(False, "error:math_verify")
    return Verdict(False, "mismatch:math_verify")


# ---------------------------------------------------------------------------------------------
# Public accuracy API
# ---------------------------------------------------------------------------------------------


def check_answer(
    answer: str,
    ground_truth: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> Verdict:
    """Decide whether ``answer`` (the ``<answer>`` content) matches ``ground_truth``.

    Order (first rule that decides wins; see the module docstring): empty / too long ->
    wrong; multiple choice; exact; number; text/LaTeX; list; tuple; plain words; guard
    against explosive input; ``math_verify`` under ``timeout_s``.

    Multiple choice: when the ground truth carries a letter and the answer is a choice form,
    the letters decide. When the ground truth is letter + value (``(A) 30``) and the answer
    is not a choice form, the answer is compared with the value by the remaining rules. A
    letter-only ground truth with a non-letter answer is wrong.
    """
    answer = "" if answer is None else str(answer)
    ground_truth = "" if ground_truth is None else str(ground_truth)
    if not answer.strip():
        return Verdict(False, "empty_answer")
    if len(answer) >= max_answer_chars:
        return Verdict(False, "answer_too_long")
    if _max_nesting(answer) > MAX_NESTING:
        return Verdict(False, "rejected:nesting")
    a, g = _strip_wrappers(answer), _strip_wrappers(ground_truth)
    if not g:
        return Verdict(False, "empty_ground_truth")
    g_choice = _parse_choice(g, answer=False)
    if g_choice is not None:
        a_choice = _parse_choice(a, answer=True)
        if a_choice is not None:
            ok = a_choice[0] == g_choice[0]
            return Verdict(ok, "match:choice" if ok else "mismatch:choice")
        if g_choice[1] is None:
            return Verdict(False, "mismatch:choice")
        g = g_choice[1]
    a = _drop_assignment(a, g)
    for rule in (_rule_exact, _rule_number, _rule_text, _rule_list, _rule_tuple, _rule_words):
        verdict = rule(a, g)
        if verdict is not None:
            return verdict
    why = _explosive(a)
    if why is not None:
        return Verdict(False, why)
    return _math_verify(a, g, timeout_s)


def is_correct(answer: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """``True`` when :func:`check_answer` accepts ``answer`` for ``ground_truth``."""
    return check_answer(answer, ground_truth, timeout_s=timeout_s).correct


def compute_score(
    response: str,
    ground_truth: str,
    *,
    acc_weight: float = ACC_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardResult:
    """Reward of one rollout.

    Rules: format-invalid -> score 0 (acc 0, format 0); valid with an empty answer or one of
    ``>= max_answer_chars`` characters -> ``format_weight``; else
    ``acc_weight * acc + format_weight``. For an invalid response ``answer`` is ``None``.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not _format_ok(response):
        return RewardResult(0.0, 0.0, 0.0, None, "format_invalid")
    parsed = parse_response(response)
    answer = parsed.answer if parsed is not None else ""
    if not answer:
        return RewardResult(float(format_weight), 0.0, 1.0, answer, "empty_answer")
    if len(answer) >= max_answer_chars:
        return RewardResult(float(format_weight), 0.0, 1.0, answer, "answer_too_long")
    verdict = check_answer(answer, ground_truth, timeout_s=timeout_s, max_answer_chars=max_answer_chars)
    acc = 1.0 if verdict.correct else 0.0
    return RewardResult(acc_weight * acc + format_weight * 1.0, acc, 1.0, answer, verdict.reason)


# ---------------------------------------------------------------------------------------------
# Plug-in reward functions
# ---------------------------------------------------------------------------------------------

RewardFn = Callable[..., RewardResult]


def _as_result(value: Any, response: str, origin: str) -> RewardResult:
    """Coerce a plug-in's return value to a :class:`RewardResult`.

    A ``RewardResult`` passes through. A number (or a dict with ``"score"``) becomes the score;
    ``acc`` defaults to the score (so accuracy-based filters see the plug-in's reward),
    ``format`` to the reference format check, ``answer`` to the extracted answer and
    ``reason`` to ``"custom"``.
    """
    if isinstance(value, RewardResult):
        return value
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward function {origin} returned a dict without a 'score' key")
        extra, value = value, value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"reward function {origin} returned {type(value).__name__}, expected a float")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward function {origin} returned a non-finite score {score}")
    fmt = extra.get("format")
    return RewardResult(
        score=score,
        acc=float(extra.get("acc", score)),
        format=float(fmt) if fmt is not None else (1.0 if _format_ok(response) else 0.0),
        answer=extra.get("answer", extract_answer(response) if len(response) < 100_000 else None),
        reason=str(extra.get("reason", "custom")),
    )


def load_reward_fn(spec: str) -> RewardFn:
    """Load ``"path/to/file.py:function"`` and wrap it to always return a :class:`RewardResult`.

    The function is called like :func:`compute_score` (``response, ground_truth, **kwargs``)
    and may return a float, a ``RewardResult`` or a dict with a ``"score"`` key. Errors name
    the file and the function: ``ValueError`` for a malformed spec, ``FileNotFoundError``,
    ``ImportError`` when the file fails to run, ``AttributeError``/``TypeError`` for a missing
    or non-callable function.
    """
    path_str, sep, name = str(spec).rpartition(":")
    if not sep or not path_str or not name.isidentifier():
        raise ValueError(f"reward function spec {spec!r} must look like 'path/to/file.py:function'")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward function file {str(path)!r} not found (wanted function {name!r})")
    mod_name = f"prism_rl_user_reward_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"cannot load reward function file {str(path)!r} (wanted function {name!r})")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise ImportError(f"error while running reward function file {str(path)!r}: {exc!r}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"reward function file {str(path)!r} has no function {name!r}")
    if not callable(fn):
        raise TypeError(f"{name!r} in reward function file {str(path)!r} is not callable")
    origin = f"{name!r} from {str(path)!r}"

    def reward_fn(response: str, ground_truth: str, **kwargs: Any) -> RewardResult:
        """Call the user's function and coerce its result."""
        return _as_result(fn(response, ground_truth, **kwargs), response, origin)

    reward_fn.__name__ = name
    reward_fn.__doc__ = f"User reward {origin}, wrapped to return a RewardResult."
    return reward_fn


def _resolve(reward_fn: RewardFn | str | None) -> RewardFn:
    """``None`` -> :func:`compute_score`; a ``"file.py:fn"`` string -> :func:`load_reward_fn`."""
    if reward_fn is None:
        return compute_score
    if isinstance(reward_fn, str):
        return load_reward_fn(reward_fn)
    return reward_fn


def _call(fn: RewardFn, response: str, ground_truth: str, kwargs: dict[str, Any]) -> RewardResult:
    """Call a reward function and coerce its output."""
    out = fn(response, ground_truth, **kwargs)
    return out if isinstance(out, RewardResult) else _as_result(out, response, repr(fn))


# ---------------------------------------------------------------------------------------------
# Batches and files
# ---------------------------------------------------------------------------------------------


def batch_scores(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    reward_fn: RewardFn | str | None = None,
    num_threads: int | None = None,
    **kwargs: Any,
) -> list[RewardResult]:
    """Score a batch (results in input order); ``kwargs`` go to the reward function.

    With the built-in reward, items run on up to ``MAX_MATH_VERIFY_WORKERS`` threads so that
    fallback calls use the worker pool in parallel; a plug-in runs sequentially unless
    ``num_threads`` is given.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    fn = _resolve(reward_fn)
    if num_threads is None:
        num_threads = MAX_MATH_VERIFY_WORKERS if fn is compute_score else 1
    pairs = list(zip(responses, ground_truths))
    if num_threads <= 1 or len(pairs) <= 1:
        return [_call(fn, r, g, kwargs) for r, g in pairs]
    with ThreadPoolExecutor(max_workers=min(num_threads, len(pairs))) as ex:
        return list(ex.map(lambda p: _call(fn, p[0], p[1], kwargs), pairs))


def _ground_truth_text(value: Any) -> str | None:
    """A JSON ground truth as text: strings as is, numbers via ``str``, lists joined by ``", "``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    return None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any], str, str]]:
    """Read and validate every line: ``(line number, record, response, ground truth)``."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RewardInputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise RewardInputError(f"{path}:{lineno}: expected a JSON object")
            for field in ("response", "ground_truth"):
                if field not in rec or rec[field] is None:
                    raise RewardInputError(f"{path}:{lineno}: missing field {field!r}")
            if not isinstance(rec["response"], str):
                raise RewardInputError(f"{path}:{lineno}: field 'response' must be a string")
            gt = _ground_truth_text(rec["ground_truth"])
            if gt is None:
                raise RewardInputError(f"{path}:{lineno}: field 'ground_truth' must be a string or number")
            rows.append((lineno, rec, rec["response"], gt))
    return rows


def score_jsonl(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    reward_fn: RewardFn | str | None = None,
) -> dict[str, float]:
    """Score a JSONL file of ``{"response", "ground_truth", ...}`` lines.

    Every line is written back with ``score``, ``acc`` and ``format`` added, to
    ``output_path`` or to stdout when it is ``None``. All lines are read and validated
    before anything is written, so a bad line (named by file, line number and field) leaves
    no partial output. Blank lines are skipped. ``reward_fn`` may be a callable or a
    ``"file.py:function"`` spec. Returns ``{"n", "mean_score", "mean_acc", "format_rate"}``.
    """
    path = Path(input_path)
    rows = _read_jsonl(path)
    fn = _resolve(reward_fn)
    results = batch_scores([r[2] for r in rows], [r[3] for r in rows], reward_fn=fn)
    out_lines = []
    for (_, rec, _, _), res in zip(rows, results):
        rec = dict(rec, score=res.score, acc=res.acc, format=res.format)
        out_lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if output_path is None:
        _write_lines(sys.stdout, out_lines)
    else:
        out = Path(output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            _write_lines(fh, out_lines)
    n = len(results)

    def mean(values: Iterable[float]) -> float:
        """Mean over the ``n`` results (0 for an empty file)."""
        return sum(values) / n if n else 0.0

    return {
        "n": n,
        "mean_score": mean(r.score for r in results),
        "mean_acc": mean(r.acc for r in results),
        "format_rate": mean(r.format for r in results),
    }


def _write_lines(fh: TextIO, lines: list[str]) -> None:
    """Write ``lines`` and flush."""
    fh.writelines(lines)
    fh.flush()
