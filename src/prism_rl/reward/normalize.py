"""Text and LaTeX normalisation shared by the answer-matching rules.

Pure string work, linear in the input (bracket scans, a bounded number of regex passes):
brackets (:func:`matching_close`, :func:`max_nesting`, :func:`split_top_level`), what
surrounds an answer (:func:`strip_wrappers`) and three strengths of normalisation:
:func:`light` (exact match), :func:`plain` (numbers, units) and :func:`norm` (text/LaTeX).
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "assignment",
    "depths",
    "light",
    "matching_close",
    "max_nesting",
    "norm",
    "plain",
    "split_top_level",
    "strip_wrappers",
    "tidy",
    "unwrap_commands",
]

# ---------------------------------------------------------------------------------------------
# String helpers
# ---------------------------------------------------------------------------------------------

def matching_close(s: str, i: int) -> int | None:
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


def max_nesting(s: str) -> int:
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
        j = matching_close(s, i)
        if j is None:
            return None
        return s[i + 1 : j], j + 1
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def split_top_level(s: str) -> list[str]:
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
    j = matching_close(s, i)
    return None if j is None else s[i + 1 : j]


def strip_wrappers(s: str) -> str:
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


def light(s: str) -> str:
    """Light normalisation for exact match: wrappers, unicode minus, white space, case."""
    return " ".join(strip_wrappers(s).translate(_MINUS).split()).casefold()


_UNWRAP_CMDS = ("text", "mathrm", "textbf", "mathbf", "textit", "mathit", "mbox", "operatorname", "textrm")
_UNWRAP_RE = re.compile(r"\\(?:" + "|".join(_UNWRAP_CMDS) + r")\s*\{")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree")
_ATOMIC_RE = re.compile(r"-?[\w.]+|\\[A-Za-z]+")


def unwrap_commands(s: str) -> str:
    """``\\text{x}``, ``\\mathrm{x}`` and similar become ``x`` (all occurrences)."""
    for _ in range(len(s)):
        m = _UNWRAP_RE.search(s)
        if m is None:
            break
        j = matching_close(s, m.end() - 1)
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
def plain(s: str) -> str:
    """LaTeX-to-plain normalisation, keeping single spaces (used by numbers and units).

    Rules: wrappers stripped; ``\\left``/``\\right``/sizing removed; spacing commands become
    spaces; ``\\text``/``\\mathrm``/... unwrapped; ``\\frac{a}{b}`` -> ``a/b``; ``^\\circ``,
    ``^{\\circ}``, ``\\circ``, ``\\degree`` -> ``°``; ``\\%`` -> ``%``; ``\\$`` -> ``$``;
    ``\\cdot``/``\\times``/``×``/``·`` -> ``*``; ``π`` -> ``\\pi``; ``x^{2}`` -> ``x^2``;
    unicode minus -> ``-``; white space collapsed; lower case.
    """
    s = strip_wrappers(s)
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = _SIZING_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = unwrap_commands(s)
    s = _replace_fracs(s)
    s = _DEGREE_RE.sub("°", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("π", "\\pi")
    s = re.sub(r"\\cdot(?![A-Za-z])|\\times(?![A-Za-z])|×|·", "*", s)
    s = re.sub(r"([\^_])\{\s*([^{}\s])\s*\}", r"\1\2", s)
    s = s.translate(_MINUS)
    s = strip_wrappers(s)
    return " ".join(s.split()).casefold()


def norm(s: str) -> str:
    """Full normalisation for the text rule: :func:`plain`, no ``°``, no white space."""
    return "".join(plain(s).replace("°", "").split())


def depths(s: str) -> list[int]:
    """Bracket depth (``()``, ``[]``, ``{}`` alike, never below 0) before each character of ``s``."""
    out, depth = [], 0
    for ch in s:
        out.append(depth)
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return out


_ASSIGN_RE = re.compile(r"(?P<name>[A-Za-z](?:_\{?\w+\}?)?|[A-Za-z]{2,3})\s*=\s*(?P<rhs>[^=]+)")


def assignment(s: str) -> tuple[str, str] | None:
    """``(name, value)`` for ``x = 2``, ``AB = 5``, ``x_{1} = 3`` (name without braces, lower case)."""
    m = _ASSIGN_RE.fullmatch(s.strip())
    if m is None:
        return None
    return m.group("name").replace("{", "").replace("}", "").casefold(), m.group("rhs").strip()


def tidy(s: str) -> str:
    """Wrappers, sizing and spacing commands and ``\\text``-like commands removed; case kept.

    The form multi-value answers are split in: ``\\,`` and ``\\;`` must not count as list
    separators, and ``x = 3 \\text{ or } x = 4`` must show its ``or``.
    """
    s = strip_wrappers(s).replace("\\left.", "").replace("\\right.", "")
    s = _SPACING_RE.sub(" ", _SIZING_RE.sub("", s))
    s = strip_wrappers(unwrap_commands(s)).translate(_MINUS)
    return " ".join(s.split())
