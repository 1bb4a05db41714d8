"""A perception score for responses to ``prism data synth`` problems: how much of what the
caption states about the image is right.

The synthetic scenes are known exactly (``scene`` column of ``align.parquet`` and
``test.parquet``: a JSON list of items ``{"row", "col", "shape", "colour", "value"}``), so a
caption can be checked fact by fact instead of only through the final answer. One *fact*
is one drawn object: a shape (colour, shape, cell), a bar (left/middle/right, colour,
height) or a digit (value, cell). The parser reads the captions of both demonstration
styles of :mod:`prism_rl.data.synth` (the teacher's, and the public terse / wordy /
grouped ones); every mention it recognises is one *stated* fact with the attributes the
caption gives (a terse "- red circle" states no cell, "bar heights: 3, 5, 2" no colours).

Matching: a stated fact that names a cell (or a bar position) is *correct* when the scene
item in that cell agrees on every stated attribute and no earlier mention claimed it; one
without a cell is correct when some unclaimed scene item agrees on every stated attribute.
Cell-bound mentions are matched first, in caption order. Then, with ``C`` correct, ``S``
stated and ``N`` scene facts (``W = S - C`` wrong statements)::

    score     = C / (N + W)        completeness and hallucination both cost
    precision = C / S              (0 when nothing is stated)
    recall    = C / N

A faithful caption scores 1; one wrong colour in a scene of ``n`` objects scores
``(n-1)/(n+1)`` (one fact missing, one invented); a caption with no recognisable mention
(garbage, or a response without ``<caption>``) scores 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PerceptionScore", "caption_text", "parse_caption", "parse_scene", "perception_score", "record_perception",
           "response_perception"]

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
BAR_COLS = {"left": 0, "middle": 1, "right": 2}
# Cell words of both styles (teacher: "top-left"; public: "top left corner"), longest first so
# "top left corner" wins over a shorter word inside it.
CELLS = {"top-left": (0, 0), "top-center": (0, 1), "top-right": (0, 2), "middle-left": (1, 0), "center": (1, 1),
         "middle-right": (1, 2), "bottom-left": (2, 0), "bottom-center": (2, 1), "bottom-right": (2, 2),
         "top left corner": (0, 0), "top middle": (0, 1), "top right corner": (0, 2), "left side": (1, 0),
         "middle": (1, 1), "right side": (1, 2), "bottom left corner": (2, 0), "bottom middle": (2, 1),
         "bottom right corner": (2, 2)}
_CELL_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, CELLS), key=len, reverse=True)) + r")\b")
_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_OBJ_RE = re.compile(rf"\b({_COLOUR}) ({_SHAPE})\b")
_GROUP_RE = re.compile(rf"^({_COLOUR}):\s*(.*)$")
_GROUP_ITEM_RE = re.compile(rf"\b({_SHAPE})\b(?:\s*\(([^)]*)\))?")
_BAR_RE = re.compile(r"\b(left|middle|right) bar\b(.*)$")
_BAR_TERSE_RE = re.compile(r"\bbar heights?:\s*(\d+(?:\s*,\s*\d+)*)")
_DIGIT_TEACHER_RE = re.compile(r'\btext "(\d+)"(?: at ([\w -]+))?')
_DIGIT_WORDY_RE = re.compile(r"\bnumber (\d+) is in the ([\w -]+)")
_DIGIT_TERSE_RE = re.compile(r"^digits\s+(\d+(?:\s*,\s*\d+)*)")


@dataclass(frozen=True)
class Mention:
    """One stated fact: the attributes the caption gives (``None``: not stated)."""

    shape: str
    cell: tuple[int, int] | None = None
    colour: str | None = None
    value: int | None = None


@dataclass(frozen=True)
class PerceptionScore:
    """Counts behind the score (formulas in the module docstring)."""

    correct: int
    stated: int
    scene: int

    @property
    def wrong(self) -> int:
        return self.stated - self.correct

    @property
    def score(self) -> float:
        """C / (N + W)."""
        denom = self.scene + self.wrong
        return self.correct / denom if denom else 1.0

    @property
    def precision(self) -> float:
        """C / S (0 when nothing is stated)."""
        return self.correct / self.stated if self.stated else 0.0

    @property
    def recall(self) -> float:
        """C / N (1 for an empty scene)."""
        return self.correct / self.scene if self.scene else 1.0


def parse_scene(scene: str | Sequence[dict]) -> list[dict]:
    """The scene as a list of item dicts; ``scene`` is the JSON text of the column or the list.
    Raises ``ValueError`` naming the bad item."""
    items = json.loads(scene) if isinstance(scene, str) else list(scene)
    if not isinstance(items, list):
        raise ValueError(f"scene: expected a JSON list of items, got {type(items).__name__}")
    for k, it in enumerate(items):
        if not isinstance(it, dict) or not {"row", "col", "shape"} <= set(it):
            raise ValueError(f"scene item {k}: expected an object with row, col, shape (colour, value), got {it!r}")
    return items


def _cell(text: str) -> tuple[int, int] | None:
    m = _CELL_RE.search(text)
    return CELLS[m.group(1)] if m else None


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _line_mentions(line: str) -> list[Mention]:
    """Every fact one caption line states (empty for a style line or noise)."""
    if m := _BAR_TERSE_RE.search(line):
        return [Mention("bar", (2, c), None, v) for c, v in enumerate(_ints(m.group(1))[:3])]
    if m := _BAR_RE.search(line):
        colour = re.search(rf"\b({_COLOUR})\b", m.group(2))
        height = _ints(m.group(2))
        return [Mention("bar", (2, BAR_COLS[m.group(1)]), colour.group(1) if colour else None,
                        height[0] if height else None)]
    if m := _DIGIT_TERSE_RE.search(line):
        return [Mention("digit", None, None, v) for v in _ints(m.group(1))]
    if m := _DIGIT_TEACHER_RE.search(line) or _DIGIT_WORDY_RE.search(line):
        return [Mention("digit", _cell(m.group(2) or ""), None, int(m.group(1)))]
    if m := _GROUP_RE.match(line):
        return [Mention(shape, _cell(where or ""), m.group(1)) for shape, where in _GROUP_ITEM_RE.findall(m.group(2))]
    if m := _OBJ_RE.search(line):
        return [Mention(m.group(2), _cell(line[m.end():]), m.group(1))]
    return []


def parse_caption(caption: str) -> list[Mention]:
    """The facts a caption states, line by line (leading "- " bullets and case ignored)."""
    out: list[Mention] = []
    for raw in caption.lower().splitlines():
        out += _line_mentions(raw.strip().lstrip("-*").strip())
    return out


def _agrees(m: Mention, it: dict) -> bool:
    if m.shape != it["shape"]:
        return False
    if m.colour is not None and m.colour != it.get("colour"):
        return False
    return m.value is None or m.value == it.get("value")


def perception_score(caption: str, scene: str | Sequence[dict]) -> PerceptionScore:
    """Score ``caption`` against ``scene`` (matching rule and formulas: module docstring)."""
    items = parse_scene(scene)
    mentions = parse_caption(caption)
    claimed = [False] * len(items)
    correct = 0
    ordered = [m for m in mentions if m.cell is not None] + [m for m in mentions if m.cell is None]
    for m in ordered:
        for k, it in enumerate(items):
            at_cell = m.cell is None or (it["row"], it["col"]) == m.cell
            if not claimed[k] and at_cell and _agrees(m, it):
                claimed[k] = True
                correct += 1
                break
    return PerceptionScore(correct, len(mentions), len(items))


def caption_text(response: str) -> str:
    """The caption of a response, leniently: from the first ``<caption>`` to ``</caption>`` (or
    to ``<think>``, or the end, when it is not closed); "" without ``<caption>``."""
    start = response.find("<caption>")
    if start < 0:
        return ""
    body = response[start + len("<caption>"):]
    ends = [i for i in (body.find("</caption>"), body.find("<think>")) if i >= 0]
    return body[:min(ends)] if ends else body


def response_perception(response: str, scene: str | Sequence[dict]) -> float:
    """:func:`perception_score` of a whole response's caption (0 without a caption)."""
    return perception_score(caption_text(response), scene).score


def record_perception(record, response: str) -> float | None:
    """:func:`response_perception` against ``record.extra["scene"]``; ``None`` when the record
    has no scene (data from elsewhere, or written before the column existed). A malformed scene
    raises :class:`~prism_rl.data.records.DataError` naming the record and field."""
    from ..data.records import DataError

    scene = record.extra.get("scene")
    if scene is None:
        return None
    try:
        return response_perception(response, scene)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{record.where('scene')}: not a scene (a JSON list of items): {e}") from None
