"""Benchmark loaders: each of the seven benchmarks' public release -> :class:`Record` objects.

A loader reads a benchmark in the layout its public release ships in and builds records: the
PRISM system prompt, one user message with an ``<image>`` placeholder per image (in the
position the benchmark puts it), the question with its options as ``(A) ...`` lines, and a
ground truth that :func:`prism_rl.reward.is_correct` can check (a letter for multiple
choice, ``Yes``/``No`` for HallusionBench, the answer string otherwise). ``extra`` carries
what scoring needs (accepted answer forms, the display form of the truth, options, meta).

=================  ==========================================================================
benchmark          layout read (``path`` = a file, or a folder searched for the default split)
=================  ==========================================================================
MathVista          HF ``AI4Math/MathVista`` parquet (``pid, question, image, decoded_image,
                   choices, unit, precision, answer, question_type, answer_type, metadata,
                   query``); the GitHub JSON (a dict keyed by pid, ``image`` a path). Multiple
                   choice answers are option *text*: the letter is found from ``choices``.
MathVerse          HF ``AI4Math/MathVerse`` ``testmini.parquet`` (``sample_index,
                   problem_index, problem_version, question, image, answer, question_type,
                   metadata, query_wo, query_cot``); choices are inside ``question``;
                   a "Vision Only" row's empty question is replaced by its ``query_cot``.
MathVision         HF ``MathLLMs/MathVision`` parquet (``id, question, options, image,
                   decoded_image, answer, solution, level, subject``) or the GitHub
                   ``data/testmini.jsonl`` (``image`` relative to the repository root).
                   ``<image1>``... in the question name sub-figures of the one image.
WeMath             ``We-Math`` ``testmini.json`` / parquet (``ID, split, knowledge concept,
                   question, option, answer, image_path, key, question number``); ``option``
                   is one string ``"A. ...; B. ..."``.
MMMU               HF ``MMMU/MMMU`` per-subject ``validation-*.parquet`` (``id, question,
                   options`` (a Python-list string), ``answer, image_1..image_7, question_type``);
                   ``<image k>`` in question/options marks where image k goes.
MMMU-Pro           HF ``MMMU/MMMU_Pro`` ``standard (10 options)`` (as MMMU, 10 options) and
                   ``vision`` (``id, image, options, answer, subject``: the question and its
                   options are in the screenshot). Accuracy = mean of the two settings.
HallusionBench     HF ``lmms-lab/HallusionBench`` ``image`` split parquet or the GitHub
                   ``HallusionBench.json`` (``category, subcategory, visual_input, set_id,
                   figure_id, question_id, question, gt_answer_details, gt_answer`` 0/1,
                   ``filename``). Questions without an image (``visual_input`` 0) are left out.
=================  ==========================================================================

The user turn's text, per benchmark (only MathVista's follows the benchmark's own evaluation
prompt so far; the others are this package's rendering of the release's fields, kept stable
so results stay comparable across runs):

=================  ==========================================================================
benchmark          prompt text after the image placeholder(s)
=================  ==========================================================================
MathVista          the release's ``query`` (what MathVista's own evaluation sends: answer-type
                   hint with the precision, ``Question: ... (Unit: u)``, ``Choices:`` lines);
                   rebuilt from the fields in the same words when a file has no ``query``
MathVerse          ``question`` (its choices inline) + :data:`MC_INSTRUCTION` for multiple
                   choice; ``query_cot`` only for "Vision Only" rows, whose question is empty
MathVision         ``question``, + ``Options:`` as ``(A) ...`` lines + :data:`MC_INSTRUCTION`
                   when it has options
WeMath             ``question`` + ``option`` split into ``(A) ...`` lines + :data:`MC_INSTRUCTION`
MMMU, MMMU-Pro     ``question`` (``<image k>`` placed inline), + ``options`` as ``(A) ...`` lines
                   + :data:`MC_INSTRUCTION` for multiple choice; MMMU-Pro vision:
                   :data:`VISION_INSTRUCTION` only
HallusionBench     ``question`` + :data:`YES_NO_INSTRUCTION`
=================  ==========================================================================

Image values may be parquet image structs (``{"bytes", "path"}``), raw bytes, ``data:`` URLs
or paths (relative to the file's folder or one of its two parents), all decoded by
:func:`prism_rl.data.images.image_ref`. A bad record raises
:class:`DataError` naming the file, the record index and the field, or with ``skip_bad`` is
skipped and noted in a :class:`BadRecords`.

This module only reads files: it imports no torch, transformers, models or rollout code (a
test checks), so data tools can load benchmarks cheaply.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError
from ..data.images import image_ref
from ..data.records import IMAGE_PLACEHOLDER, BadField, BadRecords, DataError, ImageRef, Record, report_bad
from ..format import SYSTEM_PROMPT
from .benchmark_table import BenchmarkSpec, get_benchmark

__all__ = [
    "LETTERS",
    "MC_INSTRUCTION",
    "ROW_READERS",
    "VISION_INSTRUCTION",
    "YES_NO_INSTRUCTION",
    "benchmark_files",
    "format_options",
    "load_benchmark",
    "mathvista_query",
    "split_letter_options",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices."
YES_NO_INSTRUCTION = "Answer with Yes or No."
VISION_INSTRUCTION = ("The question and its options are shown in the image. "
                      "Answer with the option's letter from the given choices.")
NO_QUESTION_TEXT = "According to the question shown in the image, answer the question."
MAX_OPTION_CHARS = 300  # longer option texts are not used as an accepted answer form


@dataclass(frozen=True)
class _Ctx:
    """Where the rows come from: the file (for messages) and its folder (for image paths)."""

    spec: BenchmarkSpec
    path: Path

    @property
    def image_dirs(self) -> tuple[Path, ...]:
        """Where relative image paths may point: the file's folder or one of its two parents
        (GitHub releases name images relative to the repository root)."""
        d = self.path.parent
        return (d, d.parent, d.parent.parent)


RowFn = Callable[[dict, int, _Ctx], "Record | None"]

# --------------------------------------------------------------------------- small helpers


def _get(row: dict, *fields: str) -> Any:
    """First present, non-empty value among ``fields`` (``None`` when there is none)."""
    for f in fields:
        v = row.get(f)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return None


def _text(row: dict, field: str) -> str:
    """A required text field, stripped."""
    v = row.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise BadField(field, "missing or empty")
    if isinstance(v, (dict, list)):
        raise BadField(field, f"expected text, got {type(v).__name__}")
    return str(v).strip()


def _opt_text(row: dict, field: str) -> str:
    v = row.get(field)
    return "" if v is None else str(v).strip()


def _image(row: dict, field: str, ctx: _Ctx) -> ImageRef | None:
    """The image in ``field`` (``None`` if empty); releases pad paths with stray whitespace."""
    value = row.get(field)
    return image_ref(value.strip() if isinstance(value, str) else value, field,
                     base_dirs=ctx.image_dirs)


def _required_image(row: dict, ctx: _Ctx, *fields: str) -> ImageRef:
    """The first non-empty image among ``fields``; a record without one is bad."""
    for f in fields:
        ref = _image(row, f, ctx)
        if ref is not None:
            return ref
    raise BadField(fields[0], "missing image")


def _as_list(value: Any, field: str) -> list[str]:
    """Options given as a list, a Python-list string (MMMU) or JSON list text."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            raise BadField(field, f"not a list: {s[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise BadField(field, f"expected a list, got {type(value).__name__}")
    return [str(v).strip() for v in value]


def _letter(answer: str, n_options: int, field: str = "answer") -> str:
    """A multiple-choice answer letter, checked against the number of options."""
    a = answer.strip().strip("()").strip().rstrip(".").upper()
    n = max(n_options, 1)
    if len(a) != 1 or a not in LETTERS[:n]:
        raise BadField(field, f"answer {answer!r} is not one of the letters A-{LETTERS[n - 1]}")
    return a


def format_options(options: list[str]) -> str:
    """``(A) first`` lines; an option that is just its own letter is shown as ``(A)``."""
    lines = []
    for letter, opt in zip(LETTERS, options):
        lines.append(f"({letter})" if opt.strip() in ("", letter) else f"({letter}) {opt}")
    return "\n".join(lines)


def _mc_accepted(letter: str, options: list[str]) -> list[str]:
    """Accepted forms for the rules: ``(B) text`` (letter, or the option text) or just ``B``."""
    idx = LETTERS.index(letter)
    text = options[idx].strip() if idx < len(options) else ""
    if text and text != letter and IMAGE_PLACEHOLDER not in text and len(text) <= MAX_OPTION_CHARS:
        return [f"({letter}) {text}"]
    return [letter]


def _mc_display(letter: str, options: list[str]) -> str:
    idx = LETTERS.index(letter)
    text = options[idx].strip() if idx < len(options) else ""
    return f"({letter}) {text}" if text and text != letter else letter


def _join(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


def _record(ctx: _Ctx, index: int, rid: Any, user: str, images: list[ImageRef], gt: str, *,
            sub: str = "", accepted: list[str] | None = None, gt_display: str | None = None,
            options: list[str] | None = None, meta: dict | None = None,
            judge_question: str | None = None) -> Record:
    """Build a benchmark record (system prompt + one user turn) and check its placeholders."""
    n = user.count(IMAGE_PLACEHOLDER)
    if n != len(images):
        raise BadField("question", f"{n} <image> placeholders but {len(images)} images")
    extra: dict[str, Any] = {"benchmark": ctx.spec.name, "accepted": accepted or [gt],
                             "gt_display": gt_display or gt, "options": options or [],
                             "meta": meta or {}}
    if judge_question:
        extra["judge_question"] = judge_question
    return Record(
        id=str(rid), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                               {"role": "user", "content": user}],
        images=images, ground_truth=gt,
        task=f"{ctx.spec.name}/{sub}" if sub else ctx.spec.name,
        extra=extra, source=str(ctx.path), index=index,
    )


def _mc_parts(question: str, options: list[str], answer: str, field: str = "answer"):
    """(user text without image, ground truth letter, accepted, display) for a MC question."""
    letter = _letter(answer, len(options), field)
    text = _join(question, "Options:", format_options(options), MC_INSTRUCTION)
    return text, letter, _mc_accepted(letter, options), _mc_display(letter, options)


# --------------------------------------------------------------------------- MathVista


# MathVista's own prompt: the release's ``query`` field, made by its evaluation code
# (evaluation/build_query.py, zero-shot): an answer-type hint, the question with its unit,
# and the choices. The GitHub JSON has no ``query`` (it ships in a separate query.json), so
# the same text is rebuilt from the fields.
_MV_HINT_MC = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
_MV_HINTS = {
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
              "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places and "
              "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
            "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def _mathvista_hint(row: dict, multi_choice: bool) -> str:
    """The answer-type hint of MathVista's query (precision 1 or 2 as the release words it;
    any other precision in the same words)."""
    if multi_choice:
        return _MV_HINT_MC
    kind = _opt_text(row, "answer_type").lower()
    if kind != "float":
        return _MV_HINTS.get(kind, "")
    prec = row.get("precision")
    if isinstance(prec, (int, float)) and prec == prec and prec >= 0:
        p = int(prec)
        if f"float{p}" in _MV_HINTS:
            return _MV_HINTS[f"float{p}"]
        return (f"Hint: Please answer the question requiring a floating-point number with {p} decimal "
                f"places and provide the final value at the end.")
    return "Hint: Please answer the question requiring a floating-point number and provide the final value at the end."


def mathvista_query(row: dict, choices: list[str]) -> str:
    """MathVista's query for ``row``: the release's ``query`` field when present, else the
    same text built from ``question``, ``unit``, ``precision``, ``answer_type`` and ``choices``."""
    query = _opt_text(row, "query")
    if query:
        return query
    question = f"Question: {_text(row, 'question')}"
    unit = _opt_text(row, "unit")
    if unit:
        question += f" (Unit: {unit})"
    block = _join("Choices:", "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))) if choices else ""
    return _join(_mathvista_hint(row, bool(choices)), question, block)


def _mathvista_row(row: dict, index: int, ctx: _Ctx) -> Record:
    pid = _get(row, "pid", "_key") or index
    _text(row, "question")
    image = _required_image(row, ctx, "decoded_image", "image")
    answer = _text(row, "answer")
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    sub = str(meta.get("task") or "")
    choices: list[str] = []
    gt, accepted, shown = answer, None, None
    if _opt_text(row, "question_type") == "multi_choice":
        choices = _as_list(row.get("choices"), "choices")
        if not choices:
            raise BadField("choices", "a multi_choice question without choices")
        stripped = [c.strip() for c in choices]
        if answer not in stripped:
            raise BadField("answer", f"answer {answer!r} is not one of the choices")
        gt = LETTERS[stripped.index(answer)]
        accepted, shown = _mc_accepted(gt, choices), _mc_display(gt, choices)
    user = f"{IMAGE_PLACEHOLDER}\n{mathvista_query(row, choices)}"
    return _record(ctx, index, pid, user, [image], gt, sub=sub, accepted=accepted, gt_display=shown,
                   options=choices)


# --------------------------------------------------------------------------- MathVerse

_INLINE_CHOICE_RE = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：]\s*(.+?)\s*$")


def _inline_choices(question: str) -> list[str]:
    """Options written inside a question after a ``Choices:`` line (``A:2`` / ``B. 3``)."""
    _, sep, tail = question.partition("Choices")
    if not sep:
        return []
    opts = []
    for line in tail.splitlines()[1:]:
        m = _INLINE_CHOICE_RE.match(line)
        if not m or m.group(1) != LETTERS[len(opts)]:
            break
        opts.append(m.group(2))
    return opts


def _mathverse_row(row: dict, index: int, ctx: _Ctx) -> Record:
    rid = _get(row, "sample_index", "_key") or index
    # "Vision Only" rows have an empty question: the release's query says to read it from the image
    question = (_opt_text(row, "question") or _opt_text(row, "query_cot") or _opt_text(row, "query_wo")
                or NO_QUESTION_TEXT)
    answer = _text(row, "answer")
    image = _image(row, "image", ctx)
    version = _opt_text(row, "problem_version")
    images = [image] if image is not None else []
    prefix = f"{IMAGE_PLACEHOLDER}\n" if image is not None else ""
    if _opt_text(row, "question_type") == "multi-choice" and re.fullmatch(r"\(?[A-H]\)?\.?", answer):
        opts = _inline_choices(question)
        letter = _letter(answer, max(len(opts), 8))
        user = prefix + _join(question, MC_INSTRUCTION)
        return _record(ctx, index, rid, user, images, letter, sub=version,
                       accepted=_mc_accepted(letter, opts), gt_display=_mc_display(letter, opts),
                       options=opts)
    return _record(ctx, index, rid, prefix + question, images, answer, sub=version)


# --------------------------------------------------------------------------- MathVision


def _mathvision_row(row: dict, index: int, ctx: _Ctx) -> Record:
    rid = _get(row, "id", "_key") or index
    question = _text(row, "question")
    image = _required_image(row, ctx, "decoded_image", "image")
    answer = _text(row, "answer")
    options = _as_list(row.get("options"), "options")
    sub = _opt_text(row, "subject")
    if options:
        body, gt, accepted, shown = _mc_parts(question, options, answer)
        return _record(ctx, index, rid, f"{IMAGE_PLACEHOLDER}\n{body}", [image], gt, sub=sub,
                       accepted=accepted, gt_display=shown, options=options)
    return _record(ctx, index, rid, f"{IMAGE_PLACEHOLDER}\n{question}", [image], answer, sub=sub)


# --------------------------------------------------------------------------- WeMath

_WEMATH_SPLIT_RE = re.compile(r"(?:^|;)\s*([A-Z])\.\s*")


def split_letter_options(text: str) -> list[str] | None:
    """WeMath's ``"A. 300, 400;B. 400, 300; E. No correct answer"`` as a list, or ``None``."""
    parts = _WEMATH_SPLIT_RE.split(text.strip())
    if len(parts) < 3 or parts[0].strip():
        return None
    letters, values = parts[1::2], [v.strip().rstrip(";").strip() for v in parts[2::2]]
    if letters != list(LETTERS[:len(letters)]) or not all(values):
        return None
    return values


def _wemath_row(row: dict, index: int, ctx: _Ctx) -> Record:
    pid = _text(row, "ID")
    key = _opt_text(row, "key")
    question = _text(row, "question")
    raw_opts = _text(row, "option")
    image = _required_image(row, ctx, "image_path", "image")
    options = split_letter_options(raw_opts)
    if options is None:  # keep the release's own option text
        letter = _letter(_text(row, "answer"), 8)
        body = _join(question, "Options:", raw_opts, MC_INSTRUCTION)
        accepted, shown, options = [letter], letter, []
    else:
        body, letter, accepted, shown = _mc_parts(question, options, _text(row, "answer"))
    rid = f"{pid}/{key}" if key else pid
    return _record(ctx, index, rid, f"{IMAGE_PLACEHOLDER}\n{body}", [image], letter, sub=key,
                   accepted=accepted, gt_display=shown, options=options,
                   meta={"ID": pid, "key": key})


# --------------------------------------------------------------------------- MMMU / MMMU-Pro

_MMMU_IMAGE_RE = re.compile(r"<image (\d+)>")
_MMMU_SUBJECT_RE = re.compile(r"^[A-Za-z]+_(.+)_\d+$")


def _interleave(texts: list[str], row: dict, ctx: _Ctx) -> tuple[list[str], list[ImageRef]]:
    """Replace ``<image k>`` by ``<image>`` (first mention) and collect image k in that order.

    A later mention of the same image becomes the text ``[image k]``; images present in the
    row but never mentioned go first, before the question.
    """
    seen: dict[int, ImageRef] = {}
    order: list[ImageRef] = []

    def repl(m: re.Match) -> str:
        k = int(m.group(1))
        if k in seen:
            return f"[image {k}]"
        ref = _image(row, f"image_{k}", ctx)
        if ref is None:
            raise BadField(f"image_{k}", "mentioned in the text but missing")
        seen[k] = ref
        order.append(ref)
        return IMAGE_PLACEHOLDER

    out = [_MMMU_IMAGE_RE.sub(repl, t) for t in texts]
    unmentioned = []
    for k in range(1, 8):
        if k not in seen:
            ref = _image(row, f"image_{k}", ctx)
            if ref is not None:
                unmentioned.append(ref)
    if unmentioned:
        out[0] = IMAGE_PLACEHOLDER * len(unmentioned) + "\n" + out[0]
    return out, unmentioned + order


def _answer_alternatives(answer: str) -> list[str]:
    """MMMU open answers may be a Python-list string of acceptable answers."""
    s = answer.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return [s]
        if isinstance(value, (list, tuple)) and value:
            return [str(v).strip() for v in value]
    return [s]


def _mmmu_row(row: dict, index: int, ctx: _Ctx, rid: str | None = None, sub: str = "") -> Record:
    rid = rid or str(_get(row, "id") or index)
    question = _text(row, "question")
    options = _as_list(row.get("options"), "options")
    qtype = _opt_text(row, "question_type") or ("multiple-choice" if options else "open")
    texts, images = _interleave([question, *options], row, ctx)
    question, options = texts[0], texts[1:]
    if not sub:
        m = _MMMU_SUBJECT_RE.match(rid)
        sub = m.group(1) if m else _opt_text(row, "subject")
    answer = _text(row, "answer")
    if qtype == "multiple-choice":
        alts = _answer_alternatives(answer)
        letters = [_letter(a, len(options)) for a in alts]
        body = _join(question, "Options:", format_options(options), MC_INSTRUCTION)
        accepted = [x for L in letters for x in _mc_accepted(L, options)]
        return _record(ctx, index, rid, body, images, letters[0], sub=sub, accepted=accepted,
                       gt_display=" or ".join(_mc_display(L, options) for L in letters),
                       options=options)
    alts = _answer_alternatives(answer)
    return _record(ctx, index, rid, question, images, alts[0], sub=sub, accepted=alts,
                   gt_display=" or ".join(alts))


def _mmmu_pro_row(row: dict, index: int, ctx: _Ctx) -> Record:
    """A standard row (question + image_k) or a vision row (one screenshot, no question)."""
    base_id = str(_get(row, "id") or index)
    if row.get("question") is not None or row.get("image_1") is not None:
        return _mmmu_row(row, index, ctx, rid=f"standard/{base_id}", sub="standard")
    image = _required_image(row, ctx, "image")
    options = _as_list(row.get("options"), "options")
    if not options:
        raise BadField("options", "missing or empty")
    alts = _answer_alternatives(_text(row, "answer"))
    letters = [_letter(a, len(options)) for a in alts]
    judge_q = _join("(The question is shown in an image.)", "Options:", format_options(options))
    return _record(ctx, index, f"vision/{base_id}", f"{IMAGE_PLACEHOLDER}\n{VISION_INSTRUCTION}",
                   [image], letters[0], sub="vision",
                   accepted=[x for L in letters for x in _mc_accepted(L, options)],
                   gt_display=" or ".join(_mc_display(L, options) for L in letters),
                   options=options, judge_question=judge_q)


# --------------------------------------------------------------------------- HallusionBench

_YES_NO = {"1": "Yes", "0": "No", "yes": "Yes", "no": "No"}


def _hallusion_row(row: dict, index: int, ctx: _Ctx) -> Record | None:
    if _opt_text(row, "visual_input") == "0":
        return None  # a question without an image: not part of the image benchmark
    image = _image(row, "image", ctx)
    if image is None:
        if not _opt_text(row, "filename"):
            return None
        image = _required_image(row, ctx, "filename")
    question = _text(row, "question")
    raw = _text(row, "gt_answer")
    if raw.lower() not in _YES_NO:
        raise BadField("gt_answer", f"expected 0 or 1, got {raw!r}")
    keys = ("category", "subcategory", "set_id", "figure_id", "question_id")
    meta = {k: _opt_text(row, k) for k in keys}
    rid = "_".join(meta[k] for k in keys) if all(meta.values()) else str(index)
    user = f"{IMAGE_PLACEHOLDER}\n" + _join(question, YES_NO_INSTRUCTION)
    return _record(ctx, index, rid, user, [image], _YES_NO[raw.lower()],
                   sub=meta["category"] or "", meta=meta)


# --------------------------------------------------------------------------- the readers

ROW_READERS: dict[str, RowFn] = {
    "mathvista": _mathvista_row, "mathverse": _mathverse_row, "mathvision": _mathvision_row,
    "wemath": _wemath_row, "mmmu": _mmmu_row, "mmmu_pro": _mmmu_pro_row,
    "hallusionbench": _hallusion_row,
}


# --------------------------------------------------------------------------- reading files

_DATA_SUFFIXES = (".parquet", ".json", ".jsonl")


def _globs(spec: BenchmarkSpec, split: str | None) -> tuple[str, ...]:
    """The spec's file patterns, for another split when one is asked for (MathVision ``test``)."""
    if split is None or split == spec.split:
        return spec.file_globs
    if not any(spec.split in g for g in spec.file_globs):
        raise ConfigError(f"{spec.name}: no other split than {spec.split!r} can be chosen by name; "
                         f"pass the data file itself")
    return tuple(g.replace(spec.split, split) for g in spec.file_globs)


def benchmark_files(name: str, path: str | Path, split: str | None = None) -> list[Path]:
    """The data files to read: ``path`` itself, or the split's files under a folder
    (the benchmark's default split unless ``split`` names another, e.g. MathVision ``test``)."""
    spec = get_benchmark(name)
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such file or folder (data for {spec.name})")
    globs = _globs(spec, split)
    found: list[Path] = []
    for pattern in globs:
        for f in sorted(p.glob(pattern)):
            if f.is_file() and f not in found:
                found.append(f)
    if not found:
        raise DataError(f"{p}: no {spec.name} {split or spec.split} files found (looked for "
                        f"{', '.join(globs)}); pass the data file itself")
    return found


def _json_rows(data: Any, path: Path) -> list[Any]:
    """Rows of a JSON file: a list, or a dict keyed by id (MathVista's GitHub JSON)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [dict(v, _key=k) for k, v in data.items()]
    raise DataError(f"{path}: expected a JSON list of records or a dict of records")


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(index, row)`` pairs; a row that cannot be parsed comes as a ``BadField``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=64)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield i, row
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read JSON: {e}") from e
        yield from enumerate(_json_rows(data, path))
    elif suffix == ".jsonl":
        i = 0
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, BadField("<line>", f"invalid JSON: {e.msg}")
                i += 1
    else:
        raise DataError(f"{path}: unknown data file type (expected {', '.join(_DATA_SUFFIXES)})")


def load_benchmark(name: str, path: str | Path, *, limit: int | None = None,
                   skip_bad: bool = False, bad: BadRecords | None = None,
                   split: str | None = None) -> list[Record]:
    """Read benchmark ``name`` from ``path`` (a file, or the downloaded release's folder, where
    the default split, or ``split``, is looked for).

    Returns at most ``limit`` records. A bad record raises :class:`DataError` naming the
    file, the record index and the field, or (``skip_bad``) is skipped and noted in ``bad``.
    Record ids are unique within a benchmark (a repeated id is a bad record).
    """
    spec = get_benchmark(name)
    read_row = ROW_READERS[spec.name]
    if skip_bad and bad is None:
        bad = BadRecords()
    out: list[Record] = []
    seen: set[str] = set()
    for f in benchmark_files(spec.name, path, split):
        ctx = _Ctx(spec, f)
        for i, row in _iter_rows(f):
            try:
                if isinstance(row, BadField):
                    raise row
                if not isinstance(row, dict):
                    raise BadField("<record>", f"expected an object, got {type(row).__name__}")
                rec = read_row(row, i, ctx)
                if rec is not None and rec.id in seen:
                    raise BadField("id", f"duplicate id {rec.id!r}")
            except BadField as e:
                report_bad(f"{f}, record {i}", e, skip_bad, bad)
                continue
            if rec is None:
                continue
            seen.add(rec.id)
            out.append(rec)
            if limit is not None and len(out) >= limit:
                return out
    return out
