"""``prism data show``: print a data file's first records turn by turn, and a contact sheet.

The file's layout is detected (:func:`prism_rl.data.layouts.detect_layout`) and named in the
first line printed. Each record is printed with every turn of its conversation (system, user
and earlier assistant turns, then the target response, or the teacher's for a prompt-only
set), its images count and its ground truth; warm-up pairs print the teacher's and the
student's segments. A benchmark release is read by the caller's ``benchmark_reader`` (the
benchmark loaders live above this layer), so showing one is not an error.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from prism_rl.data.layouts import PairRecord, detect_layout, read_pairs, read_records
from prism_rl.data.records import DataError, Record
from prism_rl.format import SYSTEM_PROMPT, extract_answer

__all__ = ["render_pair", "render_record", "show"]

BenchmarkReader = Callable[[str, Path, int], list[Record]]


def _turn(role: str, text: str) -> str:
    """``role: text`` with continuation lines indented under it."""
    if role == "system" and text == SYSTEM_PROMPT:
        text = "(the PRISM system prompt)"
    return f"  {role}: " + text.replace("\n", "\n      ")


def _prompt_lines(rec: Record) -> list[str]:
    """The record's header line and every turn of its prompt."""
    return [f"[{rec.index}] id={rec.id} task={rec.task} images={len(rec.images)}",
            *(_turn(m["role"], m["content"]) for m in rec.messages)]


def _truth_line(rec: Record, response: str | None) -> str:
    """The ground truth, and whether ``response``'s ``<answer>`` equals it."""
    got = extract_answer(response or "")
    mark = "" if got is None or rec.ground_truth is None else \
        ("  [answer matches]" if got == rec.ground_truth else f"  [answer {got} != truth]")
    return f"  ground truth: {rec.ground_truth}{mark}"


def render_record(rec: Record) -> str:
    """Every turn of ``rec``, its response (the SFT target, else the teacher's) and its ground
    truth, with whether the response's ``<answer>`` equals it."""
    response, label = rec.response, "assistant"
    if response is None and isinstance(rec.extra.get("teacher_response"), str):
        response, label = rec.extra["teacher_response"], "assistant (teacher_response)"
    last = _turn(label, response) if response is not None else "  (no response: a prompt-only record)"
    return "\n".join([*_prompt_lines(rec), last, _truth_line(rec, response)])


def render_pair(pair: PairRecord) -> str:
    """A warm-up pair: the prompt's turns, then the teacher's and the student's segments."""
    segments = [_turn(f"{who} {part}", getattr(pair, f"{who}_{part}"))
                for who in ("teacher", "student") for part in ("caption", "cot")]
    return "\n".join([*_prompt_lines(pair.record), *segments,
                      _truth_line(pair.record, pair.teacher_caption + pair.teacher_cot)])


def show(path: str | Path, out_png: str | Path | None = None, k: int = 8,
         benchmark_reader: BenchmarkReader | None = None) -> list[str]:
    """Print the layout of ``path`` and its first ``k`` records; save a contact sheet to
    ``out_png`` if given. Returns the printed blocks (the layout line first)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout.kind == "benchmark":
        if benchmark_reader is None:
            raise DataError(f"{path}: a {layout.name}; prism eval --benchmark {layout.benchmark} reads it")
        records = benchmark_reader(layout.benchmark, path, k)
        blocks = [render_record(r) for r in records]
    elif layout.kind == "pairs":
        pairs = read_pairs(path)[:k]
        records, blocks = [p.record for p in pairs], [render_pair(p) for p in pairs]
    else:
        records = read_records(path)[:k]
        blocks = [render_record(r) for r in records]
    blocks.insert(0, f"{path}: {layout.name}; {len(records)} record{'' if len(records) == 1 else 's'} shown")
    for block in blocks:
        print(block + "\n")
    if out_png is not None and records:
        contact_sheet(records, Path(out_png))
    return blocks


def contact_sheet(records: list[Record], out_png: Path) -> None:
    """Save the records' first images in a grid, each captioned with its question and truth."""
    # The object-oriented Agg API touches no global pyplot state or backend setting.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(records))
    rows = (len(records) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.9 * rows))
    FigureCanvasAgg(fig)
    for n, r in enumerate(records):
        ax = fig.add_subplot(rows, cols, n + 1)
        images = r.load_images()
        if images:
            ax.imshow(images[0], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        text = textwrap.fill(r.question.replace("\n", " "), 38)
        ax.set_xlabel(f"{text}\nanswer: {r.ground_truth}", fontsize=7)
        ax.set_title(f"{r.task} / {r.id}", fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
