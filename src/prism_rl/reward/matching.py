"""Rule-based answer matching: does the ``<answer>`` content equal the ground truth?

Pure string work (no subprocess, no threads) on an answer capped at ``max_answer_chars``;
the rules run in the order listed in :mod:`prism_rl.reward` and the first that can decide
does. Only an answer that no rule settles (and that passes the explosive-input guard) goes
to the symbolic fallback in :mod:`prism_rl.reward.math_verify_pool`. Public:
:func:`check_answer` (a :class:`Verdict` naming the deciding rule) and :func:`is_correct`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from typing import NamedTuple

from prism_rl.reward.math_verify_pool import run_math_verify

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_ANSWER_CHARS", "Verdict", "check_answer", "is_correct"]

MAX_ANSWER_CHARS = 1024
DEFAULT_TIMEOUT_S = 3.0
REL_TOL = 1e-6
MAX_NESTING = 40
MAX_POWER_DIGITS = 100_000
MAX_ITEMS = 64


class Verdict(NamedTuple):
    """Outcome of the accuracy check: ``correct`` and which rule decided (``reason``)."""

    correct: bool
    reason: str


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
# Symbolic fallback
# ---------------------------------------------------------------------------------------------


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


def check_answer(
    answer: str,
    ground_truth: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> Verdict:
    """Decide whether ``answer`` (the ``<answer>`` content) matches ``ground_truth``.

    Order (first rule that decides wins; see :mod:`prism_rl.reward`): empty / too long ->
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

