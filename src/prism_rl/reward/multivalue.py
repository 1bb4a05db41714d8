"""Multi-value answers (parts, names, tuples, lists, sets), compared one item at a time.

The ground truth decides whether order matters. Its kinds, checked in this order:

- **parts** ``(1) 5 (2) 3``, ``(a) .. (b) ..``, ``1) .. 2) ..``, ``(i) .. (ii) ..`` (labels
  1..n in any order): compared by label when the answer has the same labels, else in
  label order;
- **set** ``\\{3, 4\\}`` or ``{3, 4}``; alternatives joined by "or" (``3 or 4``, ``x = 3 or
  x = 4``); one variable given several values (``x = 3, x = 4``); a ``±`` (``\\pm 2``,
  ``1 \\pm \\sqrt{2}``): same size, each item matched once, in any order;
- **tuple** ``(3, 4)``, ``[1, 2)``: in order; the brackets must agree when the answer has
  some;
- **names** ``x = 1, y = 2`` (distinct names): by name when the answer has the same names,
  else in order;
- **list** ``3, 4``, ``3; 4``, ``3 and 4``: in order.

So ``4, 3`` is wrong for ``3, 4`` and for the point ``(3, 4)``, right for ``\\{3, 4\\}``. Why
the truth decides: a list, a point or labelled parts carry their order (the question asked
for "(1) the length, (2) the angle"); only a set, alternatives or a ``±`` say that it does
not. A ``±`` in the answer is a pair of values too (``\\pm 2`` for ``2, -2``). An answer
that is a set (``\\{1, 2, 3\\}``) against a list is read in its written order. Labels of
the other kind (names against parts) or none are read in order; the same kind with other
labels is wrong.

Several values against a one-value truth are right only when each equals it (``0.5,
\\frac12`` for ``1/2``; ``2, 3`` or ``2 or 3`` for ``2`` is a hedge, wrong). A bracketed
answer against a one-value truth is one object (``(1, 2)`` for ``1 < x < 2``) and is left
to the caller's fallback, which keeps the order inside brackets (``(4, 3)`` is not
``(3, 4)`` there; only bare lists are unordered to it).

Items go through the caller's single-value ``check`` (which may use the math-verify
fallback on that pair of items), never the whole lists: math-verify alone matched
``\\sqrt{4}, 3`` to ``3, 2`` and ``(1) 3 (2) 5`` to ``(1) 5 (2) 3``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from prism_rl.reward.normalize import assignment, depths, matching_close, tidy

__all__ = ["MAX_ITEMS", "Multi", "compare_multi", "parse_multi"]

MAX_ITEMS = 64

Check = Callable[[str, str], tuple[bool, str]]


class Multi(NamedTuple):
    """A multi-value answer: ``kind`` (set/parts/names/tuple/list), ``items``, ``labels``.

    ``labels`` are part numbers (``1``, ``2``; items sorted by them) or names, else ``None``;
    ``brackets`` is ``()``/``[]``/``(]``/``[)`` for a tuple; ``pm`` says a ``±`` was expanded.
    """

    kind: str
    items: tuple[str, ...]
    labels: tuple[str, ...] | None = None
    brackets: str = ""
    pm: bool = False


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_SEP_RE = re.compile(r"\s*[,;]\s*(?:(?:and|or)\s+)?|\s+(?:and|or)\s+", re.IGNORECASE)
_LABEL_RE = re.compile(r"(?:^|(?<=[\s,;]))\(?(\d{1,2}|[a-z]|[ivx]{2,4})\)")
_LABEL_TAIL_RE = re.compile(r"[\s,;]*(?:\band)?[\s,;]*$")
_ROMAN = {r: k for k, r in enumerate("i ii iii iv v vi vii viii ix x".split(), start=1)}
_PM_RE = re.compile(r"\\pm(?![A-Za-z])|±")
_MEMBER_RE = re.compile(r"^[A-Za-z]\s*(?:\\in(?![A-Za-z])|∈)\s*")


def _split_items(s: str) -> tuple[list[str], bool]:
    """``(items, alternatives)``: ``s`` split at top-level ``,`` ``;`` ``and`` ``or``.

    ``alternatives`` is true when an ``or`` separated two items. Empty items are dropped.
    """
    level = depths(s)
    items, start, alt = [], 0, False
    for m in _SEP_RE.finditer(s):
        if level[m.start()] == 0:
            items.append(s[start : m.start()].strip())
            start, alt = m.end(), alt or "or" in m.group(0).lower()
    items.append(s[start:].strip())
    return [x for x in items if x], alt


def _ordinals(labels: list[str]) -> list[int] | None:
    """Part numbers of ``labels`` (``1 2``, ``a b``, ``ii i``) when they are 1..n, else ``None``."""
    if all(x.isdigit() for x in labels):
        nums = [int(x) for x in labels]
    elif all(len(x) == 1 and x.isalpha() for x in labels):
        nums = [ord(x) - ord("a") + 1 for x in labels]
    elif all(x in _ROMAN for x in labels):
        nums = [_ROMAN[x] for x in labels]
    else:
        return None
    return nums if sorted(nums) == list(range(1, len(nums) + 1)) else None


def _parts(s: str) -> Multi | None:
    """Labelled parts ``(1) 5 (2) 3``: at least two top-level labels, the first at the start."""
    level = depths(s)
    found = [m for m in _LABEL_RE.finditer(s) if level[m.start()] == 0]
    if len(found) < 2 or found[0].start() != 0:
        return None
    nums = _ordinals([m.group(1) for m in found])
    ends = [m.start() for m in found[1:]] + [len(s)]
    values = [_LABEL_TAIL_RE.sub("", s[m.end() : e]).strip() for m, e in zip(found, ends)]
    if nums is None or not all(values):
        return None
    pairs = sorted(zip(nums, values))
    return Multi("parts", tuple(v for _, v in pairs), tuple(str(k) for k, _ in pairs))


def _expand_pm(items: list[str]) -> tuple[list[str], bool]:
    """``a ± b`` -> ``a+b``, ``a-b`` (one top-level ``±`` per item); ``True`` when any was expanded."""
    out, any_pm = [], False
    for x in items:
        level = depths(x)
        found = [m for m in _PM_RE.finditer(x) if level[m.start()] == 0]
        if len(found) != 1:
            out.append(x)
            continue
        head, tail = x[: found[0].start()].rstrip(), x[found[0].end() :].lstrip()
        out += [f"{head}+{tail}" if head else tail, f"{head}-{tail}"]
        any_pm = True
    return out, any_pm


def _classify(items: list[str], as_set: bool, pm: bool) -> Multi:
    """Kind of an item list: set (flagged, or one variable throughout), names, or list."""
    named = [assignment(x) for x in items]
    names = [n[0] for n in named if n is not None]
    if len(names) == len(items) and len(set(names)) == 1:
        return Multi("set", tuple(n[1] for n in named), pm=pm)  # type: ignore[index]
    if as_set or pm:
        return Multi("set", tuple(items), pm=pm)
    if len(names) == len(items) and len(set(names)) == len(items):
        return Multi("names", tuple(n[1] for n in named), tuple(names))  # type: ignore[index]
    return Multi("list", tuple(items))


def _enclosed(s: str) -> tuple[str, str] | None:
    """``(brackets, inside)`` when one bracket pair encloses all of ``s`` (``\\{..\\}`` -> ``{}``)."""
    if s.startswith("\\{") and s.endswith("\\}") and matching_close(s, 1) == len(s) - 1:
        return "{}", s[2:-2].strip()
    if s[:1] in "([{" and matching_close(s, 0) == len(s) - 1:
        return s[0] + s[-1], s[1:-1].strip()
    return None


def parse_multi(s: str) -> Multi | None:
    """The multi-value reading of ``s`` (see the module docstring), ``None`` for one value.

    Checked in order: labelled parts; a set in braces (also of one item, also after
    ``x \\in``); a tuple in ``()``/``[]`` of two or more items; an unbracketed list of two
    or more items (a single ``±`` expands to two).
    """
    s = _MEMBER_RE.sub("", tidy(s))
    parts = _parts(s)
    if parts is not None:
        return parts
    outer = _enclosed(s)
    if outer is not None and outer[0] == "{}":
        items, _ = _split_items(outer[1])
        return _classify(_expand_pm(items)[0], True, False) if items else None
    if outer is not None:
        items, _ = _split_items(outer[1])
        return Multi("tuple", tuple(items), brackets=outer[0]) if len(items) >= 2 else None
    items, alt = _split_items(s)
    items, pm = _expand_pm(items)
    return _classify(items, alt, pm) if len(items) >= 2 else None


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


class _Tally:
    """Runs ``check`` on item pairs and remembers whether the fallback decided any of them."""

    def __init__(self, check: Check) -> None:
        self.check, self.fallback, self.last = check, False, ""

    def __call__(self, a: str, g: str) -> bool:
        ok, reason = self.check(a, g)
        self.fallback = self.fallback or "math_verify" in reason
        self.last = reason
        return ok

    def verdict(self, ok: bool, kind: str) -> tuple[bool, str]:
        """``match:<kind>`` / ``mismatch:<kind>`` (``+math_verify`` when the fallback took part).

        A mismatch caused by an item that timed out or was rejected keeps that item's reason.
        """
        if not ok and self.last.split(":")[0] in ("timeout", "rejected", "error"):
            return False, self.last
        return ok, ("match:" if ok else "mismatch:") + kind + ("+math_verify" if self.fallback else "")


def _as_set(a: tuple[str, ...], g: tuple[str, ...], same: _Tally) -> bool:
    """Same size and every truth item matched by a distinct answer item (greedy pairing)."""
    if len(a) != len(g):
        return False
    left = list(a)
    for x in g:
        hit = next((k for k, y in enumerate(left) if same(y, x)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _pairs(am: Multi, gm: Multi) -> list[tuple[str, str]] | None:
    """Answer and truth items to compare in order; ``None`` when the labels cannot agree.

    Same label set on both sides -> paired by label; labels of the same kind that differ ->
    ``None``; otherwise by position (sizes must agree).
    """
    if am.labels and gm.labels and set(am.labels) == set(gm.labels):
        by_label = dict(zip(am.labels, am.items))
        return [(by_label[k], x) for k, x in zip(gm.labels, gm.items)]
    if am.labels and gm.labels and am.kind == gm.kind:
        return None
    if len(am.items) != len(gm.items):
        return None
    return list(zip(am.items, gm.items))


def _against_one(am: Multi, g: str, same: _Tally) -> tuple[bool, str] | None:
    """Several values for a one-value truth: right only when each equals it; tuples abstain."""
    if am.kind == "tuple":
        return None
    return same.verdict(all(same(x, g) for x in am.items), "list")


def compare_multi(a: str, g: str, check: Check) -> tuple[bool, str] | None:
    """``(correct, reason)`` when either side is multi-valued, else ``None`` (one value each).

    ``check(answer_item, truth_item)`` is the single-value comparison. Past ``MAX_ITEMS``
    items the answer is rejected. See the module docstring for the rules.
    """
    gm, am = parse_multi(g), parse_multi(a)
    if gm is None and am is None:
        return None
    same = _Tally(check)
    if max(len(gm.items) if gm else 1, len(am.items) if am else 1) > MAX_ITEMS:
        return False, "rejected:items"
    if gm is None:
        return _against_one(am, g, same)  # type: ignore[arg-type]
    am = am or Multi("list", (a,))
    if gm.kind == "set" or am.pm:
        return same.verdict(_as_set(am.items, gm.items, same), "set")
    if gm.kind == am.kind == "tuple" and am.brackets != gm.brackets:
        return False, "mismatch:tuple"
    pairs = _pairs(am, gm)
    return same.verdict(pairs is not None and all(same(x, y) for x, y in pairs), gm.kind)
