"""A deterministic procedural visual-reasoning dataset for the CPU quickstart.

Every problem is a small PIL image (white background, a 3x3 grid of cells; at the default
96 px each cell is 32x32 px, i.e. exactly one Qwen3-VL visual token after the 2x2 patch
merge) and a question that needs both perception (read colours, shapes, bar heights,
digits) and a little reasoning (count, compare, add, multiply) to answer. Families:

* ``count``  - coloured circles/squares/triangles; "How many red circles are there?"
* ``arith``  - the same scenes; "How many more circles than squares are there?",
  "What is the number of red shapes plus the number of triangles?", "How many shapes are
  not green?"
* ``chart``  - a 3-bar chart with heights 1..6; tallest/shortest bar (multiple choice),
  height of one bar, sum of two bars, tallest minus shortest.
* ``digits`` - 2-3 digits; sum, largest, smallest, product (of two digits).

Some questions are multiple choice ("(A) 3 (B) 4 ..."), answered with the option letter.

Each problem gets two demonstrations in the ``<caption>/<think>/<answer>`` format:

* **teacher** - faithful, compact and always in the same style (the curated set);
* **public** - a different, noisier distribution: other phrasings and object orders,
  terse or wordy captions, and with probability ``public_error_rate`` a slip: a
  *perception* slip (the caption misreads one object and the reasoning follows it to a
  wrong answer) or a *reasoning* slip (correct caption, result off by one / wrong pick).
  With ``public_style="teacher"`` the public demonstrations use the teacher's template
  instead (same slips), so teacher and public differ only in content quality, as in the
  paper's data; ``varied`` (the default) is the style-mismatched control.

:func:`synthesize` writes ``sft.json`` (ShareGPT; public demos for the SFT pool plus
teacher demos for a ``teacher_frac`` share), ``align.parquet`` and ``test.parquet`` (verl
layout with teacher fields and the ``scene``, which ``prism_rl.eval.perception`` scores
captions against) and ``stats.json``. The same seed gives the same bytes: all
randomness comes from ``random.Random`` instances seeded from strings (no global RNG), and
problem ``i`` depends only on the seed and the problems before it.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prism_rl.data.layouts import write_sharegpt_json, write_verl_parquet
from prism_rl.data.records import IMAGE_PLACEHOLDER, ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response, split_text

__all__ = ["FAMILIES", "PUBLIC_STYLES", "Problem", "make_problem", "scene_json", "synthesize"]

FAMILIES = ("count", "arith", "chart", "digits")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235)}
GRID = 3  # cells per side; fixed so position words mean the same at every image size
LETTERS = "ABCD"
BAR_POS = ("left", "middle", "right")
MAX_BAR = 6

# Teacher position words (one fixed vocabulary) and the public ones (another).
POS = {(0, 0): "top-left", (0, 1): "top-center", (0, 2): "top-right",
       (1, 0): "middle-left", (1, 1): "center", (1, 2): "middle-right",
       (2, 0): "bottom-left", (2, 1): "bottom-center", (2, 2): "bottom-right"}
PUBLIC_POS = {(0, 0): "top left corner", (0, 1): "top middle", (0, 2): "top right corner",
              (1, 0): "left side", (1, 1): "middle", (1, 2): "right side",
              (2, 0): "bottom left corner", (2, 1): "bottom middle",
              (2, 2): "bottom right corner"}
# Digits a reader plausibly confuses (perception slips); 0 never appears in the images.
CONFUSABLE = {1: (7, 4), 2: (7, 3), 3: (8, 5), 4: (9, 1), 5: (6, 3), 6: (5, 8), 7: (1, 2),
              8: (3, 6, 9), 9: (4, 8)}


# --------------------------------------------------------------------------- problem model


@dataclass(frozen=True, order=True)
class Item:
    """One drawn thing, in cell (row, col); sorts in reading order."""

    row: int
    col: int
    shape: str  # circle | square | triangle | bar | digit
    colour: str  # red | green | blue | black
    value: int = 0  # bar height or digit value

    @property
    def pos(self) -> str:
        return POS[(self.row, self.col)]


@dataclass(frozen=True)
class Fact:
    """A quantity read off the image; ``where`` lists the cells it was counted in."""

    label: str
    value: int
    where: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Solution:
    """How the answer follows from the image: facts, the operation on ``picks``, the value."""

    style: str  # objects | bars | digits: how the facts are phrased
    facts: tuple[Fact, ...]
    op: str  # count | add | sub | mul | max | min | read | argmax | argmin
    value: int | str
    picks: tuple[int, ...]  # indices of the facts the operation uses


@dataclass(frozen=True)
class Query:
    """A question and the rule that answers it for any scene (so slips propagate)."""

    kind: str
    text: str
    solve: Callable[[tuple[Item, ...]], Solution]
    options: tuple[str, ...] | None = None

    @property
    def question(self) -> str:
        if not self.options:
            return self.text
        opts = " ".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(self.options))
        return f"{self.text}\nOptions: {opts}"

    def answer(self, value: int | str) -> str | None:
        """Answer string for a value; ``None`` if no well-formed answer says it."""
        if isinstance(value, int) and value < 0:
            return None
        if self.options:
            return LETTERS[self.options.index(str(value))] if str(value) in self.options else None
        return str(value)


@dataclass(frozen=True)
class Problem:
    """One generated problem with its image (PNG bytes) and exact ground truth."""

    pid: str
    family: str
    items: tuple[Item, ...]
    query: Query
    image: bytes

    @property
    def solution(self) -> Solution:
        return self.query.solve(self.items)

    @property
    def ground_truth(self) -> str:
        answer = self.query.answer(self.solution.value)
        assert answer is not None, "generator produced an unanswerable problem"
        return answer


# --------------------------------------------------------------------------- families


def _plural(word: str) -> str:
    return word + "s"


def _random_shapes(rng: random.Random, n: int) -> tuple[Item, ...]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return tuple(sorted(Item(r, c, rng.choice(SHAPES), rng.choice(list(COLOURS)))
                        for r, c in cells))


def _count_fact(label: str, pred: Callable[[Item], bool], items: tuple[Item, ...],
                with_where: bool = True) -> Fact:
    hits = [it for it in items if pred(it)]
    return Fact(label, len(hits), tuple(it.pos for it in hits) if with_where else None)


def _category(rng: random.Random, items: tuple[Item, ...], kind: str
              ) -> tuple[str, Callable[[Item], bool]]:
    """A (label, predicate) over shapes: by colour, shape or both; mostly one that occurs."""
    ref = rng.choice(items) if rng.random() < 0.8 else \
        Item(0, 0, rng.choice(SHAPES), rng.choice(list(COLOURS)))
    shape, colour = ref.shape, ref.colour
    if kind == "shape":
        return _plural(shape), lambda it: it.shape == shape
    if kind == "colour":
        return f"{colour} shapes", lambda it: it.colour == colour
    return f"{colour} {_plural(shape)}", lambda it: it.shape == shape and it.colour == colour


def _numeric_options(rng: random.Random, correct: int) -> tuple[str, ...]:
    """Four consecutive non-negative numbers that include ``correct`` at a random place."""
    start = max(0, correct - rng.randint(0, 3))
    return tuple(str(v) for v in range(start, start + 4))


def _maybe_mc(rng: random.Random, query: Query, items: tuple[Item, ...], p: float) -> Query:
    if rng.random() >= p:
        return query
    return replace(query, options=_numeric_options(rng, int(query.solve(items).value)))


def _gen_count(rng: random.Random) -> tuple[tuple[Item, ...], Query]:
    items = _random_shapes(rng, rng.randint(3, 7))
    kind = rng.choice(("colour_shape", "colour_shape", "shape", "colour"))
    label, pred = _category(rng, items, kind)

    def solve(scene: tuple[Item, ...]) -> Solution:
        v = _count_fact(label, pred, scene)
        return Solution("objects", (v,), "count", v.value, (0,))

    query = Query(f"count_{kind}", f"How many {label} are there?", solve)
    return items, _maybe_mc(rng, query, items, 0.3)


def _gen_arith(rng: random.Random) -> tuple[tuple[Item, ...], Query]:
    items = _random_shapes(rng, rng.randint(4, 8))
    kind = rng.choice(("diff", "sum", "not"))
    if kind == "diff":
        by = rng.choice(("shape", "colour"))
        if by == "shape":
            a, b = rng.sample(SHAPES, 2)
            cats = [(_plural(a), lambda it, a=a: it.shape == a),
                    (_plural(b), lambda it, b=b: it.shape == b)]
        else:
            a, b = rng.sample(list(COLOURS), 2)
            cats = [(f"{a} shapes", lambda it, a=a: it.colour == a),
                    (f"{b} shapes", lambda it, b=b: it.colour == b)]
        # Ask "more X than Y" with X the larger group so the true answer is never negative.
        cats.sort(key=lambda c: -_count_fact(c[0], c[1], items).value)
        (la, pa), (lb, pb) = cats
        text = f"How many more {la} than {lb} are there?"
        op = "sub"
    elif kind == "sum":
        la, pa = _category(rng, items, "colour")
        lb, pb = _category(rng, items, "shape")
        text = f"What is the number of {la} plus the number of {lb}?"
        op = "add"
    else:
        colour = rng.choice(list(COLOURS))
        la, pa = "shapes", lambda it: True
        lb, pb = f"{colour} shapes", lambda it: it.colour == colour
        text = f"How many shapes are not {colour}?"
        op = "sub"

    def solve(scene: tuple[Item, ...]) -> Solution:
        fa = _count_fact(la, pa, scene, with_where=kind != "not")
        fb = _count_fact(lb, pb, scene)
        value = fa.value - fb.value if op == "sub" else fa.value + fb.value
        return Solution("objects", (fa, fb), op, value, (0, 1))

    return items, Query(f"arith_{kind}", text, solve)


def _gen_chart(rng: random.Random) -> tuple[tuple[Item, ...], Query]:
    kind = rng.choice(("tallest", "shortest", "height", "sum", "range"))
    while True:
        heights = [rng.randint(1, MAX_BAR) for _ in BAR_POS]
        # Tallest/shortest questions need a unique extreme to have one right option.
        if kind == "tallest" and heights.count(max(heights)) > 1:
            continue
        if kind == "shortest" and heights.count(min(heights)) > 1:
            continue
        break
    items = tuple(Item(GRID - 1, c, "bar", rng.choice(list(COLOURS)), h)
                  for c, h in enumerate(heights))

    def facts(scene: tuple[Item, ...]) -> tuple[Fact, ...]:
        return tuple(Fact(f"{BAR_POS[it.col]} bar", it.value) for it in scene)

    if kind in ("tallest", "shortest"):
        pick = max if kind == "tallest" else min

        def solve(scene: tuple[Item, ...]) -> Solution:
            fs = facts(scene)
            k = fs.index(pick(fs, key=lambda f: f.value))
            op = "argmax" if kind == "tallest" else "argmin"
            return Solution("bars", fs, op, BAR_POS[k], (k,))

        return items, Query(f"chart_{kind}", f"Which bar is {kind}?", solve, BAR_POS)
    if kind == "height":
        k = rng.randrange(len(BAR_POS))

        def solve(scene: tuple[Item, ...]) -> Solution:
            fs = facts(scene)
            return Solution("bars", fs, "read", fs[k].value, (k,))

        query = Query("chart_height", f"What is the height of the {BAR_POS[k]} bar?", solve)
        return items, _maybe_mc(rng, query, items, 0.3)
    if kind == "sum":
        i, j = sorted(rng.sample(range(len(BAR_POS)), 2))

        def solve(scene: tuple[Item, ...]) -> Solution:
            fs = facts(scene)
            return Solution("bars", fs, "add", fs[i].value + fs[j].value, (i, j))

        text = f"What is the sum of the heights of the {BAR_POS[i]} and {BAR_POS[j]} bars?"
        return items, Query("chart_sum", text, solve)

    def solve(scene: tuple[Item, ...]) -> Solution:
        fs = facts(scene)
        hi = max(range(len(fs)), key=lambda n: (fs[n].value, -n))
        lo = min(range(len(fs)), key=lambda n: (fs[n].value, n))
        return Solution("bars", fs, "sub", fs[hi].value - fs[lo].value, (hi, lo))

    return items, Query("chart_range", "How much taller is the tallest bar than the "
                                       "shortest bar?", solve)


def _gen_digits(rng: random.Random) -> tuple[tuple[Item, ...], Query]:
    n = rng.choice((2, 3))
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    items = tuple(sorted(Item(r, c, "digit", "black", rng.randint(1, 9)) for r, c in cells))
    kinds = ("sum", "max", "min", "product") if n == 2 else ("sum", "sum", "max", "min")
    kind = rng.choice(kinds)
    op = {"sum": "add", "max": "max", "min": "min", "product": "mul"}[kind]
    texts = {"sum": "What is the sum of the digits?", "max": "What is the largest digit?",
             "min": "What is the smallest digit?",
             "product": "What is the product of the two digits?"}

    def solve(scene: tuple[Item, ...]) -> Solution:
        fs = tuple(Fact("digit", it.value, (it.pos,)) for it in scene)
        vals = [f.value for f in fs]
        value = {"add": sum(vals), "max": max(vals), "min": min(vals),
                 "mul": vals[0] * vals[-1] if len(vals) == 2 else -1}[op]
        return Solution("digits", fs, op, value, tuple(range(len(fs))))

    query = Query(f"digits_{kind}", texts[kind], solve)
    return items, _maybe_mc(rng, query, items, 0.3 if kind in ("max", "min") else 0.15)


GENERATORS: dict[str, Callable[[random.Random], tuple[tuple[Item, ...], Query]]] = {
    "count": _gen_count, "arith": _gen_arith, "chart": _gen_chart, "digits": _gen_digits}


# --------------------------------------------------------------------------- drawing


def render(items: Sequence[Item], size: int = 96) -> bytes:
    """Draw a scene as PNG bytes (deterministic: no metadata, fixed compression)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    if any(it.shape == "bar" for it in items):
        _draw_chart_axes(draw, size)
    font = ImageFont.load_default(size=max(8, round(cell * 0.95)))
    for it in items:
        x0, y0 = it.col * cell, it.row * cell
        m = cell * 0.15
        box = (round(x0 + m), round(y0 + m), round(x0 + cell - m) - 1, round(y0 + cell - m) - 1)
        if it.shape == "circle":
            draw.ellipse(box, fill=COLOURS[it.colour])
        elif it.shape == "square":
            draw.rectangle(box, fill=COLOURS[it.colour])
        elif it.shape == "triangle":
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])],
                         fill=COLOURS[it.colour])
        elif it.shape == "bar":
            unit = size / MAX_BAR
            draw.rectangle((round(x0 + m), round(size - it.value * unit),
                            round(x0 + cell - m) - 1, size - 2), fill=COLOURS[it.colour])
        elif it.shape == "digit":
            draw.text((x0 + cell / 2, y0 + cell / 2), str(it.value), fill="black", font=font,
                      anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _draw_chart_axes(draw: ImageDraw.ImageDraw, size: int) -> None:
    # One faint gridline per unit: at 96 px a unit is 16 px, one vision patch.
    unit = size / MAX_BAR
    for u in range(1, MAX_BAR):
        y = round(size - u * unit)
        draw.line((0, y, size - 1, y), fill=(205, 205, 205), width=1)
    draw.line((0, size - 1, size - 1, size - 1), fill=(0, 0, 0), width=1)


# --------------------------------------------------------------------------- problems


def make_problem(index: int, seed: int, family: str, image_size: int = 96,
                 seen: set | None = None) -> tuple[Problem, random.Random]:
    """Problem ``index`` of ``family`` for ``seed``; also returns its RNG for the demos.

    ``seen`` (scene + question signatures) makes the generator redraw exact duplicates, so
    a held-out problem never appears verbatim in a training split.
    """
    rng = random.Random(f"prism-synth:{seed}:{family}:{index}")
    for _ in range(100):
        items, query = GENERATORS[family](rng)
        sig = (family, items, query.question)
        if seen is None or sig not in seen:
            break
    if seen is not None:
        seen.add(sig)
    problem = Problem(f"{family}-{index:05d}", family, items, query, render(items, image_size))
    return problem, rng


# --------------------------------------------------------------------------- teacher style


def teacher_response(problem: Problem) -> str:
    """The faithful, compact demonstration, always in one style."""
    sol = problem.solution
    caption = _teacher_caption(problem.items)
    think = _teacher_think(sol, sol.value, problem.query)
    return make_response(caption, think, problem.ground_truth)


def _teacher_caption(items: Sequence[Item]) -> str:
    if items and items[0].shape == "bar":
        lines = ["- Style: bar chart, 3 bars, y-axis 0-6, one gridline per unit"]
        lines += [f"- {BAR_POS[it.col]} bar: {it.colour}, height {it.value}" for it in items]
    elif items and items[0].shape == "digit":
        lines = ["- Style: black digits on white, 3x3 grid"]
        lines += [f'- text "{it.value}" at {it.pos}' for it in items]
    else:
        lines = ["- Style: flat shapes on white, 3x3 grid"]
        lines += [f"- {it.colour} {it.shape}, {it.pos}" for it in items]
    return "\n".join(lines)


def _teacher_think(sol: Solution, value: int | str, query: Query) -> str:
    lines = []
    if sol.style == "bars":
        lines.append("Bar heights: " + ", ".join(
            f"{f.label.split()[0]} {f.value}" for f in sol.facts) + ".")
    elif sol.style == "digits":
        lines.append("Digits: " + ", ".join(str(f.value) for f in sol.facts) + ".")
    else:
        for f in sol.facts:
            label = f.label[0].upper() + f.label[1:]
            if f.where is None:
                lines.append(f"{label}: {f.value}.")
            else:
                lines.append(f"{label}: {', '.join(f.where) or 'none'} -> {f.value}.")
    vals = [str(sol.facts[k].value) for k in sol.picks]
    names = [sol.facts[k].label.split()[0] for k in sol.picks]
    op = sol.op
    if op == "count":
        lines.append(f"Total: {value}.")
    elif op in ("add", "mul"):
        sign = " + " if op == "add" else " * "
        prefix = f"{' + '.join(names).capitalize()}: " if sol.style == "bars" else ""
        lines.append(f"{prefix}{sign.join(vals)} = {value}.")
    elif op == "sub":
        prefix = "Tallest - shortest: " if sol.style == "bars" else ""
        lines.append(f"{prefix}{vals[0]} - {vals[1]} = {value}.")
    elif op in ("max", "min"):
        lines.append(f"{'Largest' if op == 'max' else 'Smallest'}: {value}.")
    elif op == "read":
        lines.append(f"The {sol.facts[sol.picks[0]].label} is {value}.")
    else:
        lines.append(f"{'Tallest' if op == 'argmax' else 'Shortest'}: {value}.")
    answer = query.answer(value)
    if query.options and answer is not None:
        lines.append(f"{value} is option ({answer}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- public style


@dataclass(frozen=True)
class PublicDemo:
    response: str
    error: str  # none | perception | reasoning


PUBLIC_STYLES = ("varied", "teacher")


def public_response(problem: Problem, rng: random.Random, error_rate: float,
                    style: str = "varied") -> PublicDemo:
    """A demonstration from the noisier public distribution (maybe with one slip).

    ``style`` ``varied``: other templates than the teacher's (terse/wordy/grouped captions,
    other phrasings). ``teacher``: the teacher's template, so that a public demonstration
    differs from the teacher's only by its slip (a clean one equals the teacher's text). The
    slip is drawn the same way in both styles, so the same problems get the same slips.
    """
    items, error = problem.items, "none"
    sol = problem.solution
    value: int | str = sol.value
    if rng.random() < error_rate:
        slipped = _perception_slip(problem, rng) if rng.random() < 0.5 else None
        if slipped is not None:
            items, error = slipped, "perception"
            sol = problem.query.solve(items)
            value = sol.value
        else:
            value, error = _reasoning_slip(problem, rng), "reasoning"
    if style == "teacher":
        caption, think = _teacher_caption(items), _teacher_think(sol, value, problem.query)
    else:
        caption = _public_caption(items, rng)
        think = _public_think(sol, value, problem.query, rng)
    answer = problem.query.answer(value)
    assert answer is not None
    return PublicDemo(make_response(caption, think, answer), error)


def _perception_slip(problem: Problem, rng: random.Random) -> tuple[Item, ...] | None:
    """A scene with one object misread that changes the (still well-formed) answer.

    Small misreads (one colour, shape or digit, a bar off by one unit, a missed object) are
    tried first; a bar off by two only when no small misread changes the answer, as for
    "which bar is tallest?" with clearly separated bars.
    """
    items, truth = problem.items, problem.ground_truth
    small: list[tuple[Item, ...]] = []
    large: list[tuple[Item, ...]] = []
    for k, it in enumerate(items):
        others = items[:k] + items[k + 1:]
        if it.shape in SHAPES:
            changed = [replace(it, colour=c) for c in COLOURS if c != it.colour]
            changed += [replace(it, shape=s) for s in SHAPES if s != it.shape]
            small += [tuple(sorted(others + (c,))) for c in changed]
            small.append(others)  # a missed object
        elif it.shape == "bar":
            for delta, tier in ((1, small), (2, large)):
                tier += [items[:k] + (replace(it, value=h),) + items[k + 1:]
                         for h in (it.value - delta, it.value + delta) if 1 <= h <= MAX_BAR]
        else:
            small += [items[:k] + (replace(it, value=d),) + items[k + 1:]
                      for d in CONFUSABLE[it.value]]
            if len(items) > 2:
                small.append(others)
    for tier in (small, large):
        rng.shuffle(tier)
        for scene in tier:
            answer = problem.query.answer(problem.query.solve(scene).value)
            if answer is not None and answer != truth:
                return scene
    return None


def _reasoning_slip(problem: Problem, rng: random.Random) -> int | str:
    """A wrong final value from the right facts: off by one, or the wrong bar picked."""
    value = problem.solution.value
    if isinstance(value, int):
        wrong: list[int | str] = [value + 1, value - 1]
    else:
        wrong = [p for p in BAR_POS if p != value]
    rng.shuffle(wrong)
    for w in wrong:
        answer = problem.query.answer(w)
        if answer is not None and answer != problem.ground_truth:
            return w
    raise AssertionError(f"no reasoning slip possible for {problem.pid}")


def _public_caption(items: Sequence[Item], rng: random.Random) -> str:
    style = rng.choice(("terse", "wordy", "grouped"))
    order = list(items)
    if items and items[0].shape == "bar":
        if style == "terse":
            return "- bar chart\n- bar heights: " + ", ".join(str(it.value) for it in order)
        lines = ["- A bar chart with three vertical bars on a white background."]
        lines += [f"- The {BAR_POS[it.col]} bar is {it.colour} and {it.value} units high."
                  for it in order]
        return "\n".join(lines)
    if items and items[0].shape == "digit":
        if style == "terse":
            return "- digits " + ", ".join(str(it.value) for it in order)
        lines = ["- A white image with black numbers written on it."]
        lines += [f"- The number {it.value} is in the {PUBLIC_POS[(it.row, it.col)]}."
                  for it in order]
        return "\n".join(lines)
    rng.shuffle(order)
    if style == "terse":
        return "\n".join(f"- {it.colour} {it.shape}" for it in order)
    if style == "wordy":
        lines = ["- This is a simple synthetic picture with colored shapes on a white "
                 "background."]
        lines += [f"- There is a {it.colour} {it.shape} in the {PUBLIC_POS[(it.row, it.col)]}."
                  for it in order]
        return "\n".join(lines)
    lines = []
    for colour in COLOURS:
        group = [f"{it.shape} ({PUBLIC_POS[(it.row, it.col)]})" for it in order
                 if it.colour == colour]
        if group:
            lines.append(f"- {colour}: " + ", ".join(group))
    return "\n".join(lines)


def _public_think(sol: Solution, value: int | str, query: Query, rng: random.Random) -> str:
    lines = ["Let me think step by step."] if rng.random() < 0.3 else []
    if sol.style == "bars":
        hs = [f.value for f in sol.facts]
        lines.append(rng.choice((f"The bars are {hs[0]}, {hs[1]} and {hs[2]} units tall.",
                                 f"Reading the y-axis: left={hs[0]}, middle={hs[1]}, "
                                 f"right={hs[2]}.")))
    elif sol.style == "digits":
        ds = [str(f.value) for f in sol.facts]
        lines.append(rng.choice((f"The numbers shown are {', '.join(ds)}.",
                                 f"I can read the digits {' '.join(ds)}.")))
    else:
        for f in sol.facts:
            lines.append(rng.choice((f"I count the {f.label}: there are {f.value}.",
                                     f"Looking for {f.label}... found {f.value}.",
                                     f"Number of {f.label} = {f.value}")))
    vals = [str(sol.facts[k].value) for k in sol.picks]
    op = sol.op
    if op == "count":
        lines.append(rng.choice((f"So the answer is {value}.", f"That gives {value}.")))
    elif op == "add":
        lines.append(rng.choice((f"Adding them: {' plus '.join(vals)} is {value}.",
                                 f"So {'+'.join(vals)}={value}.")))
    elif op == "sub":
        lines.append(rng.choice((f"The difference is {vals[0]} minus {vals[1]}, which is "
                                 f"{value}.", f"{vals[0]}-{vals[1]}={value}")))
    elif op == "mul":
        lines.append(rng.choice((f"Multiplying gives {value}.",
                                 f"{' times '.join(vals)} = {value}")))
    elif op in ("max", "min"):
        word = "biggest" if op == "max" else "smallest"
        lines.append(rng.choice((f"The {word} one is {value}.", f"{op.capitalize()} is {value}.")))
    elif op == "read":
        lines.append(f"So the {sol.facts[sol.picks[0]].label} has height {value}.")
    else:
        word = "highest" if op == "argmax" else "lowest"
        lines.append(f"The {value} bar is the {word}.")
    answer = query.answer(value)
    if query.options and answer is not None:
        lines.append(rng.choice((f"That corresponds to option {answer}.", f"Option {answer}.")))
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def _messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": IMAGE_PLACEHOLDER + problem.query.question}]


def _record(problem: Problem, rid: str, response: str | None, extra: dict) -> Record:
    return Record(id=rid, messages=_messages(problem), images=[ImageRef(data=problem.image)],
                  response=response, ground_truth=problem.ground_truth, task=problem.family,
                  extra={"query": problem.query.kind, **extra})


def scene_json(items: Sequence[Item]) -> str:
    """The scene as compact JSON (the ``scene`` column; ``prism_rl.eval.perception`` reads it)."""
    return json.dumps([{"row": it.row, "col": it.col, "shape": it.shape, "colour": it.colour,
                        "value": it.value} for it in items], separators=(",", ":"))


def _teacher_fields(teacher: str) -> dict[str, str]:
    # teacher_response == teacher_caption + "\n" + teacher_cot (caption segment keeps its
    # tags, as the discriminator scores it; cot runs from <think> to </answer>).
    caption, rest = split_text(teacher)
    return {"teacher_caption": caption, "teacher_cot": rest.lstrip("\n"),
            "teacher_response": teacher}


def _split(indices_by_family: dict[str, list[int]], seed: int, test_frac: float,
           align_frac: float) -> dict[str, list[int]]:
    """Stratified per family: every family with problems gets at least one held-out one."""
    out: dict[str, list[int]] = {"sft": [], "align": [], "test": []}
    for family, idx in indices_by_family.items():
        idx = list(idx)
        random.Random(f"prism-synth:{seed}:split:{family}").shuffle(idx)
        n_test = max(1, round(test_frac * len(idx))) if test_frac > 0 and idx else 0
        n_align = min(round(align_frac * len(idx)), len(idx) - n_test)
        out["test"] += idx[:n_test]
        out["align"] += idx[n_test:n_test + n_align]
        out["sft"] += idx[n_test + n_align:]
    return {k: sorted(v) for k, v in out.items()}


def synthesize(out_dir: str | Path, n: int, seed: int = 0, *, image_size: int = 96,
               families: Sequence[str] = FAMILIES, public_error_rate: float = 0.15,
               test_frac: float = 0.15, align_frac: float = 0.15,
               teacher_frac: float = 0.1, public_style: str = "varied") -> dict:
    """Generate ``n`` problems and write sft.json, align.parquet, test.parquet, stats.json.

    Families are assigned round-robin; the test and align splits are drawn per family. Each
    SFT-pool problem gets a public demonstration (in ``public_style``, see
    :func:`public_response`); a ``teacher_frac`` share also gets the teacher one. The
    alignment pool holds teacher demonstrations only. align/test rows carry the ``scene``
    (:func:`scene_json`) for the perception score. Returns what ``stats.json`` holds.
    """
    families = tuple(families)
    unknown = [f for f in families if f not in GENERATORS]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    for name, frac in (("public_error_rate", public_error_rate), ("test_frac", test_frac),
                       ("align_frac", align_frac), ("teacher_frac", teacher_frac)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    if test_frac + align_frac > 1.0:
        raise ValueError("test_frac + align_frac must not exceed 1")
    if public_style not in PUBLIC_STYLES:
        raise ValueError(f"public_style must be one of {', '.join(PUBLIC_STYLES)}, got {public_style!r}")
    if image_size < 3 * 8:
        raise ValueError(f"image_size must be at least 24, got {image_size}")

    seen: set = set()
    problems, publics, by_family = [], [], {f: [] for f in families}
    for i in range(n):
        family = families[i % len(families)]
        problem, rng = make_problem(i, seed, family, image_size, seen)
        problems.append(problem)
        publics.append(public_response(problem, rng, public_error_rate, public_style))
        by_family[family].append(i)
    splits = _split(by_family, seed, test_frac, align_frac)
    sft_idx = splits["sft"]
    with_teacher = set(random.Random(f"prism-synth:{seed}:teacher").sample(
        sft_idx, round(teacher_frac * len(sft_idx))))

    sft: list[Record] = []
    for i in sft_idx:
        p, pub = problems[i], publics[i]
        sft.append(_record(p, f"{p.pid}-public", pub.response,
                           {"problem_id": p.pid, "style": "public", "public_error": pub.error}))
        if i in with_teacher:
            sft.append(_record(p, f"{p.pid}-teacher", teacher_response(p),
                               {"problem_id": p.pid, "style": "teacher"}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_sharegpt_json(sft, out / "sft.json", image_dir="images")
    for split in ("align", "test"):
        recs = [_record(problems[i], problems[i].pid, None,
                        {"split": split, **_teacher_fields(teacher_response(problems[i])),
                         "public_response": publics[i].response,
                         "public_error": publics[i].error, "scene": scene_json(problems[i].items)})
                for i in splits[split]]
        write_verl_parquet(recs, out / f"{split}.parquet")

    stats = _stats(problems, publics, splits, sft, seed, image_size, families, public_error_rate)
    if public_style != "varied":   # the default's stats.json stays as it was
        stats["public_style"] = public_style
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


def _stats(problems: list[Problem], publics: list[PublicDemo], splits: dict[str, list[int]],
           sft: list[Record], seed: int, image_size: int, families: tuple[str, ...],
           rate: float) -> dict:
    teachers = [teacher_response(p) for p in problems]
    errors = {kind: sum(d.error == kind for d in publics) for kind in ("perception", "reasoning")}
    return {
        "seed": seed,
        "n_problems": len(problems),
        "image_size": image_size,
        "families": list(families),
        "problems": {split: {f: sum(problems[i].family == f for i in idx) for f in families}
                     for split, idx in splits.items()},
        "sft_records": {style: sum(r.extra["style"] == style for r in sft)
                        for style in ("public", "teacher")},
        "public_errors": {**errors, "configured_rate": rate,
                          "observed_rate": round(sum(errors.values()) / len(problems), 4)},
        "avg_response_chars": {
            "teacher": round(sum(map(len, teachers)) / len(teachers), 1),
            "public": round(sum(len(d.response) for d in publics) / len(publics), 1)},
        "queries": _query_counts(problems),
    }


def _query_counts(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in problems:
        kind = p.query.kind + ("_mc" if p.query.options else "")
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
