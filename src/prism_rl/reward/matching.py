"""Rule-based answer matching: does the ``<answer>`` content equal the ground truth?

Pure string work (no subprocess, no threads) on an answer capped at ``max_answer_chars``;
the rules run in the order listed in :mod:`prism_rl.reward` and the first that can decide
does. Only a single value that no rule settles (and that passes the explosive-input guard)
goes to the symbolic fallback in :mod:`prism_rl.reward.math_verify_pool`; a multi-value
answer is split by :mod:`prism_rl.reward.multivalue` first (order matters unless the ground
truth is a set; the table is there) and its items come back here one pair at a time.
Public: :func:`check_answer` (a :class:`Verdict` naming the deciding rule) and
:func:`is_correct`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from typing import NamedTuple

from prism_rl.reward.math_verify_pool import run_math_verify
from prism_rl.reward.multivalue import compare_multi
from prism_rl.reward.normalize import (
    assignment,
    light,
    matching_close,
    max_nesting,
    norm,
    plain,
    strip_wrappers,
    unwrap_commands,
)

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_ANSWER_CHARS", "Verdict", "check_answer", "is_correct"]

MAX_ANSWER_CHARS = 1024
DEFAULT_TIMEOUT_S = 3.0
REL_TOL = 1e-6
MAX_NESTING = 40
MAX_POWER_DIGITS = 100_000


class Verdict(NamedTuple):
    """Outcome of the accuracy check: ``correct`` and which rule decided (``reason``)."""

    correct: bool
    reason: str


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
    t = plain(s)
    if len(t) > 2 and t[0] == "(" and matching_close(t, 0) == len(t) - 1:
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
# Multiple choice
# ---------------------------------------------------------------------------------------------

_GT_LETTER_RE = re.compile(r"\(?([A-Z])\)?[.:]?")
_LETTER_VALUE_RE = re.compile(r"\(([A-Z])\)\s*(.+)|([A-Z])\)\s*(.+)|([A-Z])[.:]\s+(.+)", re.DOTALL)
_ANSWER_VALUE_RE = re.compile(r"\(([A-Za-z])\)\s*(.+)|([A-Za-z])\)\s*(.+)|([A-Z])[.:]\s+(.+)", re.DOTALL)
_WHY = r"(?:because|since|given|which|is\s+(?:the\s+)?(?:correct|right|true)(?:\s+(?:answer|option|choice))?)"
_ANSWER_LETTER_RE = re.compile(rf"\(?([A-Za-z])\)?(?:[.:)]|\s*[,;:-]?\s+{_WHY}\b.*)?", re.DOTALL)


def _parse_choice(s: str, *, answer: bool) -> tuple[str, str | None] | None:
    """``(letter, value or None)`` for a multiple-choice form, else ``None``.

    Forms: ``B``, ``(B)``, ``B.``, ``B)``, ``B:``; with a value ``(A) 30``, ``A) 30``,
    ``C. 12 cm``, ``A: 30``. A ground truth's letter is upper case. An answer may also use
    a lower-case letter (``b``, ``(b)``, ``b)``, ``(b) 30``) and may give a reason after it:
    ``C because ...``, ``C, since ...``, ``A is correct`` (but ``C and D``, ``A triangle
    ...``, ``B is wrong`` are no choice). Lead-ins ("The answer is", "Option") and wrappers
    were stripped by :func:`strip_wrappers`, ``\\text{...}`` by :func:`unwrap_commands`.
    """
    m = (_ANSWER_LETTER_RE if answer else _GT_LETTER_RE).fullmatch(s)
    if m:
        return m.group(1).upper(), None
    m = (_ANSWER_VALUE_RE if answer else _LETTER_VALUE_RE).fullmatch(s)
    if m:
        letter = m.group(1) or m.group(3) or m.group(5)
        value = (m.group(2) or m.group(4) or m.group(6)).strip()
        return letter.upper(), value or None
    return None


def _choice_form(s: str, *, answer: bool) -> tuple[str, str | None] | None:
    """:func:`_parse_choice` of ``s`` with ``\\text{...}``-like commands unwrapped first."""
    return _parse_choice(strip_wrappers(unwrap_commands(s)), answer=answer)


def _rule_choice(a: str, g: str) -> Verdict | str:
    """Letters decide when the truth has one and the answer is a choice form.

    Returns a :class:`Verdict`, or the ground truth the other rules compare with: the
    option's value for ``(A) 30`` and a non-choice answer, ``g`` itself for no letter.
    A letter-only ground truth with a non-choice answer is wrong.
    """
    g_choice = _choice_form(g, answer=False)
    if g_choice is None:
        return g
    a_choice = _choice_form(a, answer=True)
    if a_choice is not None:
        ok = a_choice[0] == g_choice[0]
        return Verdict(ok, "match:choice" if ok else "mismatch:choice")
    return Verdict(False, "mismatch:choice") if g_choice[1] is None else g_choice[1]


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def _drop_assignment(a: str, g: str) -> str:
    """``x = 2`` -> ``2`` (also ``AB = 5``, ``x_1 = 3``) when the other side has no ``=``."""
    if "=" in g:
        return a
    named = assignment(a)
    return named[1] if named else a


def _rule_exact(a: str, g: str) -> Verdict | None:
    """Equal after light normalisation -> correct."""
    return Verdict(True, "match:exact") if light(a) == light(g) else None


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
    return Verdict(True, "match:text") if norm(a) == norm(g) else None


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
    la, lg = light(a), light(g)
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
    if max_nesting(a) > MAX_NESTING:
        return "rejected:nesting"
    if _TOWER_RE.search(a):
        return "rejected:power"
    for m in _POWER_RE.finditer(a):
        base, exp = float(m.group(1)), int(m.group(2))
        if base > 1 and exp * math.log10(base) > MAX_POWER_DIGITS:
            return "rejected:power"
    return None


# ---------------------------------------------------------------------------------------------
# Symbolic fallback
# ---------------------------------------------------------------------------------------------


class _Fallback:
    """The math-verify calls of one check (one per pair of items), sharing one time budget.

    The first call gets ``timeout_s`` (it may also wait for a worker to start); every later
    call gets what is left of ``timeout_s`` counted from the end of the first one, and none
    is made after a timeout. So a check costs at most about ``2 * timeout_s`` plus the hard
    deadline's grace, however many items it has.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.deadline, self.timed_out = timeout_s, None, False

    def __call__(self, answer: str, gold: str) -> Verdict:
        left = self.timeout_s if self.deadline is None else min(self.timeout_s, self.deadline - time.monotonic())
        if self.timed_out or left <= 0:
            return Verdict(False, "timeout")
        verdict = _math_verify(answer, gold, left)
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        self.timed_out = verdict.reason == "timeout"
        return verdict


def _math_verify(answer: str, gold: str, timeout_s: float) -> Verdict:
    """The pool's result as a :class:`Verdict` (a timeout or a worker error scores wrong)."""
    result = run_math_verify(answer, gold, timeout_s)
    if result == "true":
        return Verdict(True, "match:math_verify")
    if result in ("timeout", "hard_timeout"):
        return Verdict(False, "timeout")
    if result == "error":
        return Verdict(False, "error:math_verify")
    return Verdict(False, "mismatch:math_verify")


# ---------------------------------------------------------------------------------------------
# Public accuracy API
# ---------------------------------------------------------------------------------------------


def _compare(a: str, g: str, fallback: _Fallback, depth: int = 0) -> Verdict:
    """One answer against one truth, both without wrappers (also used for list items).

    Order: a ``name =`` dropped from either side when the other has no ``=``; exact;
    number; text/LaTeX; multi-value (:mod:`prism_rl.reward.multivalue`, items back through
    this function, at most ``MAX_NESTING`` levels deep); plain words; the explosive-input
    guard; ``fallback``.
    """
    a, g = _drop_assignment(a, g), _drop_assignment(g, a)
    for rule in (_rule_exact, _rule_number, _rule_text):
        verdict = rule(a, g)
        if verdict is not None:
            return verdict
    if depth < MAX_NESTING:
        multi = compare_multi(a, g, lambda x, y: _compare(x, y, fallback, depth + 1))
        if multi is not None:
            return Verdict(*multi)
    verdict = _rule_words(a, g)
    if verdict is not None:
        return verdict
    why = _explosive(a)
    return Verdict(False, why) if why is not None else fallback(a, g)


def check_answer(
    answer: str,
    ground_truth: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> Verdict:
    """Decide whether ``answer`` (the ``<answer>`` content) matches ``ground_truth``.

    Order (first rule that decides wins; see :mod:`prism_rl.reward`): empty / too long /
    too deeply nested -> wrong; multiple choice (:func:`_rule_choice`); then
    :func:`_compare`, whose math-verify calls share ``timeout_s`` (:class:`_Fallback`).
    """
    answer = "" if answer is None else str(answer)
    ground_truth = "" if ground_truth is None else str(ground_truth)
    if not answer.strip():
        return Verdict(False, "empty_answer")
    if len(answer) >= max_answer_chars:
        return Verdict(False, "answer_too_long")
    if max_nesting(answer) > MAX_NESTING:
        return Verdict(False, "rejected:nesting")
    a, g = strip_wrappers(answer), strip_wrappers(ground_truth)
    if not g:
        return Verdict(False, "empty_ground_truth")
    g = _rule_choice(a, g)
    if isinstance(g, Verdict):
        return g
    return _compare(a, g, _Fallback(timeout_s))


def is_correct(answer: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """``True`` when :func:`check_answer` accepts ``answer`` for ``ground_truth``."""
    return check_answer(answer, ground_truth, timeout_s=timeout_s).correct
