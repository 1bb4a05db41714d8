"""Benchmark loaders: each of the seven benchmarks' public release -> :class:`Record` objects.

A loader reads a benchmark in the layout its public release ships in and builds records: the
PRISM system prompt and one user turn, an ``<image>`` placeholder per image (where the
benchmark puts it) followed by the benchmark's own prompt (``prism_rl.eval.benchmark_prompts``,
docs/BENCHMARKS.md), and a ground truth that :func:`prism_rl.reward.is_correct` can check (a
letter for multiple choice, ``Yes``/``No`` for HallusionBench, the answer string otherwise).
``extra`` carries what scoring needs: the accepted answer forms and the truth's display form,
the options, what the judge is shown (``judge_question``, ``judge_reference``) and ``meta``,
the record's metadata (subject, level, concept, version ...), which goes to every sample row.

=================  ==========================================================================
benchmark          layout read (``path`` = a file, or a folder searched for the default split)
=================  ==========================================================================
MathVista          HF ``AI4Math/MathVista`` parquet (``pid, question, image, decoded_image,
                   choices, unit, precision, answer, question_type, answer_type, metadata,
                   query``); the GitHub JSON (a dict keyed by pid, ``image`` a path). Multiple
                   choice answers are option *text*: the letter is found from ``choices``.
MathVerse          HF ``AI4Math/MathVerse`` ``testmini.parquet`` or ``testmini.json``
                   (``sample_index, problem_index, problem_version, question, image, answer,
                   question_type, metadata, query_wo, query_cot, question_for_eval``); choices
                   are inside ``question``; JSON image paths may point into ``images.zip``.
MathVision         HF ``MathLLMs/MathVision`` parquet (``id, question, options, image,
                   decoded_image, answer, solution, level, subject``) or the GitHub
                   ``data/testmini.jsonl`` (``image`` relative to the repository root).
                   ``<image1>``... in the question name sub-figures of the one image.
WeMath             ``We-Math`` ``testmini.json`` / parquet (``ID, split, knowledge concept,
                   question, option, answer, image_path, key, question number``); ``option``
                   is one string ``"A. ...; B. ..."``; images may still be in the zip.
MMMU               HF ``MMMU/MMMU`` per-subject ``validation-*.parquet`` (``id, question,
                   options`` (a Python-list string), ``answer, image_1..image_7, question_type``);
                   ``<image k>`` in question/options marks where image k goes.
MMMU-Pro           HF ``MMMU/MMMU_Pro`` ``standard (10 options)`` (as MMMU, 10 options) and
                   ``vision`` (``id, image, options, answer, subject``: the question and its
                   options are in the screenshot).
HallusionBench     HF ``lmms-lab/HallusionBench`` ``image`` split parquet or the GitHub
                   ``HallusionBench.json`` (``category, subcategory, visual_input, set_id,
                   figure_id, question_id, question, gt_answer_details, gt_answer`` 0/1,
                   ``filename``). Questions without an image (``visual_input`` 0) are left out.
=================  ==========================================================================

A folder holding one split twice (parquet and JSON) is read once (``release_files``). Image
values may be parquet image structs (``{"bytes", "path"}``), raw bytes, ``data:`` URLs or paths
(relative to the file's folder or one of its two parents, or inside a ``.zip`` there), decoded
by :func:`prism_rl.data.images.image_ref`. A bad record raises :class:`DataError` naming the
file, the record index and the field, or with ``skip_bad`` is skipped and noted in a
:class:`BadRecords`.

This module only reads files: it imports no torch, transformers, models or rollout code (a
test checks), so data tools can load benchmarks cheaply.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import image_ref
from ..data.records import IMAGE_PLACEHOLDER, BadField, BadRecords, ImageRef, Record, report_bad
from ..format import SYSTEM_PROMPT
from . import benchmark_prompts as P
from .benchmark_table import BenchmarkSpec, get_benchmark
from .release_files import benchmark_files, find_release_files, iter_rows, zipped_image, zips_in

__all__ = ["LETTERS", "MMMU_DOMAINS", "ROW_READERS", "benchmark_files", "load_benchmark", "mathvista_query",
           "split_letter_options"]

log = logging.getLogger(__name__)

LETTERS = P.LETTERS
MAX_OPTION_CHARS = 300  # longer option texts are not used as an accepted answer form
IMAGE_IN_TEXT = "[image]"  # what the judge (a text model) sees where the model saw an image
MMMU_DOMAINS = {  # MMMU's six disciplines (its data_utils.DOMAIN_CAT2SUB_CAT)
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_DOMAIN_OF = {s: d for d, subjects in MMMU_DOMAINS.items() for s in subjects}


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
    """The image in ``field`` (``None`` if empty); releases pad paths with stray whitespace. A
    path not on disk is looked for in the zips next to the file (a folder not yet unpacked)."""
    value = row.get(field)
    value = value.strip() if isinstance(value, str) else value
    try:
        return image_ref(value, field, base_dirs=ctx.image_dirs)
    except BadField as e:
        if not (isinstance(value, str) and e.why.startswith("image file not found")):
            raise
        hit = zipped_image(value, ctx.image_dirs)
        if hit is not None:
            return ImageRef(data=hit[0])
        zips = zips_in(ctx.image_dirs)
        hint = (f"; not inside {', '.join(map(str, zips))} either" if zips else
                f"; unpack the release's image archive so that it is {ctx.path.parent / value}")
        raise BadField(field, e.why + hint) from None


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


def _meta(**fields: Any) -> dict:
    """Metadata without empty values (``None``, empty text or list)."""
    return {k: v for k, v in fields.items() if v not in (None, "", [], ())}


def _record(ctx: _Ctx, index: int, rid: Any, user: str, images: list[ImageRef], gt: str, *,
            judge_question: str, sub: str = "", accepted: list[str] | None = None,
            gt_display: str | None = None, options: list[str] | None = None, meta: dict | None = None,
            judge_reference: str | None = None, yes_no: bool = False) -> Record:
    """Build a benchmark record (system prompt + one user turn) and check its placeholders."""
    n = user.count(IMAGE_PLACEHOLDER)
    if n != len(images):
        raise BadField("question", f"{n} <image> placeholders but {len(images)} images")
    extra: dict[str, Any] = {"benchmark": ctx.spec.name, "accepted": accepted or [gt],
                             "gt_display": gt_display or gt, "options": options or [],
                             "meta": meta or {},
                             "judge_question": judge_question.replace(IMAGE_PLACEHOLDER, IMAGE_IN_TEXT).strip(),
                             "judge_reference": judge_reference or gt_display or gt}
    if yes_no:
        extra["yes_no"] = True
    return Record(
        id=str(rid), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                               {"role": "user", "content": user}],
        images=images, ground_truth=gt,
        task=f"{ctx.spec.name}/{sub}" if sub else ctx.spec.name,
        extra=extra, source=str(ctx.path), index=index,
    )


def _mc(answer: str, options: list[str], n_letters: int | None = None) -> tuple[str, dict]:
    """The truth letter of a multiple-choice row and the record keywords it gives."""
    letter = _letter(answer, n_letters or len(options))
    return letter, {"accepted": _mc_accepted(letter, options), "gt_display": _mc_display(letter, options),
                    "options": options}


# --------------------------------------------------------------------------- MathVista


def mathvista_query(row: dict, choices: list[str]) -> str:
    """MathVista's query for ``row`` (:func:`benchmark_prompts.mathvista_query`)."""
    query = _opt_text(row, "query")
    return P.mathvista_query(query, "" if query else _text(row, "question"), _opt_text(row, "unit"),
                             _opt_text(row, "answer_type"), row.get("precision"), choices)


def _mathvista_row(row: dict, index: int, ctx: _Ctx) -> Record:
    pid = _get(row, "pid", "_key") or index
    _text(row, "question")
    image = _required_image(row, ctx, "decoded_image", "image")
    answer = _text(row, "answer")
    md = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    choices: list[str] = []
    gt, kw = answer, {}
    if _opt_text(row, "question_type") == "multi_choice":
        choices = _as_list(row.get("choices"), "choices")
        if not choices:
            raise BadField("choices", "a multi_choice question without choices")
        stripped = [c.strip() for c in choices]
        if answer not in stripped:
            raise BadField("answer", f"answer {answer!r} is not one of the choices")
        gt, kw = _mc(LETTERS[stripped.index(answer)], choices)
    query = mathvista_query(row, choices)
    meta = _meta(question_type=_opt_text(row, "question_type"), answer_type=_opt_text(row, "answer_type"),
                 **{k: md.get(k) for k in ("task", "context", "grade", "category", "source", "skills", "language")})
    return _record(ctx, index, pid, f"{IMAGE_PLACEHOLDER}\n{query}", [image], gt, judge_question=query,
                   sub=str(md.get("task") or ""), meta=meta, **kw)


# --------------------------------------------------------------------------- MathVerse

_INLINE_CHOICE_RE = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：]\s*(.+?)\s*$")
_MC_ANSWER_RE = re.compile(r"\(?[A-H]\)?\.?")


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
    """The release's ``query_wo`` as the prompt; ``question_for_eval`` (the full question, which
    a Vision Only row's ``question`` lacks) to the judge."""
    rid = _get(row, "sample_index", "_key") or index
    question, qtype = _opt_text(row, "question"), _opt_text(row, "question_type")
    version = _opt_text(row, "problem_version")
    answer = _text(row, "answer")
    image = _image(row, "image", ctx)
    for_eval = _opt_text(row, "question_for_eval") or question or "(The question is shown in the image.)"
    query = P.mathverse_query(_opt_text(row, "query_wo"), question, qtype, version == "Vision Only" or not question)
    md = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    meta = _meta(problem_version=version, problem_index=_opt_text(row, "problem_index"), question_type=qtype,
                 subject=md.get("subject"), subfield=md.get("subfield"), source=md.get("source"))
    images = [image] if image is not None else []
    user = (f"{IMAGE_PLACEHOLDER}\n" if image is not None else "") + query
    gt, kw = answer, {}
    if qtype == "multi-choice" and _MC_ANSWER_RE.fullmatch(answer):
        opts = _inline_choices(for_eval) or _inline_choices(question)
        gt, kw = _mc(answer, opts, max(len(opts), 8))
    return _record(ctx, index, rid, user, images, gt, judge_question=for_eval, sub=version, meta=meta, **kw)


# --------------------------------------------------------------------------- MathVision


def _mathvision_row(row: dict, index: int, ctx: _Ctx) -> Record:
    rid = _get(row, "id", "_key") or index
    question = _text(row, "question")
    image = _required_image(row, ctx, "decoded_image", "image")
    answer = _text(row, "answer")
    options = _as_list(row.get("options"), "options")
    sub = _opt_text(row, "subject")
    gt, kw = (_mc(answer, options) if options else (answer, {}))
    return _record(ctx, index, rid, f"{IMAGE_PLACEHOLDER}\n{P.mathvision_prompt(question, options)}", [image], gt,
                   judge_question=P.join_lines(question, P.mathvision_options(options)), sub=sub,
                   meta=_meta(subject=sub, level=row.get("level")), **kw)


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
    """We-Math's prompt with the release's ``option`` text; ``meta`` holds the problem ``ID``,
    the sub-problem ``key`` (``2steps_1`` ... ``3steps_multi``) and the knowledge concept, which
    the four-dimensional metric and the breakdown need."""
    pid = _text(row, "ID")
    key = _opt_text(row, "key")
    question = _text(row, "question")
    raw_opts = _text(row, "option")
    image = _required_image(row, ctx, "image_path", "image")
    options = split_letter_options(raw_opts) or []
    gt, kw = _mc(_text(row, "answer"), options, len(options) or 8)
    meta = _meta(ID=pid, key=key, **{"knowledge concept": _opt_text(row, "knowledge concept")})
    return _record(ctx, index, f"{pid}/{key}" if key else pid, f"{IMAGE_PLACEHOLDER}\n{P.wemath_prompt(question, raw_opts)}",
                   [image], gt, judge_question=P.join_lines(f"Question: {question}", f"Option: {raw_opts}"),
                   sub=key, meta=meta, **kw)


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


def _mc_alternatives(answer: str, options: list[str]) -> tuple[str, dict]:
    """Truth letter(s) of an MMMU multiple-choice row (an answer may list several)."""
    letters = [_letter(a, len(options)) for a in _answer_alternatives(answer)]
    return letters[0], {"accepted": [x for L in letters for x in _mc_accepted(L, options)],
                        "gt_display": " or ".join(_mc_display(L, options) for L in letters), "options": options}


def _mmmu_subject(rid: str, row: dict) -> str:
    m = _MMMU_SUBJECT_RE.match(rid)
    return _opt_text(row, "subject") or (m.group(1) if m else "")


def _mmmu_row(row: dict, index: int, ctx: _Ctx, rid: str | None = None, pro: bool = False) -> Record:
    """MMMU's prompt (MMMU-Pro's standard-setting prompt when ``pro``), images in place."""
    rid = rid or str(_get(row, "id") or index)
    options = _as_list(row.get("options"), "options")
    qtype = _opt_text(row, "question_type") or ("multiple-choice" if options else "open")
    texts, images = _interleave([_text(row, "question"), *options], row, ctx)
    question, options = texts[0], texts[1:]
    subject = _mmmu_subject(str(_get(row, "id") or ""), row)
    meta = _meta(setting="standard" if pro else None, subject=subject, domain=_DOMAIN_OF.get(subject),
                 subfield=_opt_text(row, "subfield"), topic_difficulty=_opt_text(row, "topic_difficulty"),
                 question_type=None if pro else qtype)
    answer = _text(row, "answer")
    if pro or qtype == "multiple-choice":
        gt, kw = _mc_alternatives(answer, options)
        text = P.mmmu_pro_standard_prompt(question, options) if pro else P.mmmu_prompt(question, options)
        judge_q = P.join_lines(question, P.parenthesised_options(options))
    else:
        alts = _answer_alternatives(answer)
        gt, kw = alts[0], {"accepted": alts, "gt_display": " or ".join(alts)}
        text, judge_q = P.mmmu_prompt(question, []), question
    return _record(ctx, index, rid, text, images, gt, judge_question=judge_q,
                   sub="standard" if pro else subject, meta=meta, **kw)


def _mmmu_pro_row(row: dict, index: int, ctx: _Ctx) -> Record:
    """A standard row (question + image_k) or a vision row (one screenshot, no question)."""
    base_id = str(_get(row, "id") or index)
    if row.get("question") is not None or row.get("image_1") is not None:
        return _mmmu_row(row, index, ctx, rid=f"standard/{base_id}", pro=True)
    image = _required_image(row, ctx, "image")
    options = _as_list(row.get("options"), "options")
    if not options:
        raise BadField("options", "missing or empty")
    gt, kw = _mc_alternatives(_text(row, "answer"), options)
    subject = _mmmu_subject(base_id, row)
    judge_q = P.join_lines("(The question is shown in an image.)", P.parenthesised_options(options))
    return _record(ctx, index, f"vision/{base_id}", f"{IMAGE_PLACEHOLDER}\n{P.MMMU_PRO_VISION}", [image], gt,
                   judge_question=judge_q, sub="vision",
                   meta=_meta(setting="vision", subject=subject, domain=_DOMAIN_OF.get(subject)), **kw)


# --------------------------------------------------------------------------- HallusionBench

_YES_NO = {"1": "Yes", "0": "No", "yes": "Yes", "no": "No"}
_HB_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")


def _hallusion_row(row: dict, index: int, ctx: _Ctx) -> Record | None:
    """The question as asked; the judge is shown the release's ``gt_answer_details`` with the
    label, as HallusionBench's own GPT check is."""
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
    ids = {k: _opt_text(row, k) for k in _HB_KEYS}
    rid = "_".join(ids[k] for k in _HB_KEYS) if all(ids.values()) else str(index)
    label, details = _YES_NO[raw.lower()], _opt_text(row, "gt_answer_details")
    return _record(ctx, index, rid, f"{IMAGE_PLACEHOLDER}\n{P.hallusion_prompt(question)}", [image], label,
                   judge_question=question, judge_reference=f"{label}. {details}" if details else label,
                   sub=ids["category"], meta=_meta(**ids, visual_input=_opt_text(row, "visual_input")),
                   yes_no=True)


# --------------------------------------------------------------------------- the readers

ROW_READERS: dict[str, RowFn] = {
    "mathvista": _mathvista_row, "mathverse": _mathverse_row, "mathvision": _mathvision_row,
    "wemath": _wemath_row, "mmmu": _mmmu_row, "mmmu_pro": _mmmu_pro_row,
    "hallusionbench": _hallusion_row,
}


def _read_row(read_row: RowFn, row: Any, i: int, ctx: _Ctx, seen: set[str]) -> Record | None:
    if isinstance(row, BadField):
        raise row
    if not isinstance(row, dict):
        raise BadField("<record>", f"expected an object, got {type(row).__name__}")
    rec = read_row(row, i, ctx)
    if rec is not None and rec.id in seen:
        raise BadField("id", f"duplicate id {rec.id!r}")
    return rec


def load_benchmark(name: str, path: str | Path, *, limit: int | None = None,
                   skip_bad: bool = False, bad: BadRecords | None = None,
                   split: str | None = None, notes: list[str] | None = None) -> list[Record]:
    """Read benchmark ``name`` from ``path`` (a file, or the downloaded release's folder, where
    the default split, or ``split``, is looked for; one representation of it is read, and the
    sentence saying which is logged and appended to ``notes``).

    Returns at most ``limit`` records. A bad record raises :class:`DataError` naming the
    file, the record index and the field, or (``skip_bad``) is skipped and noted in ``bad``.
    Record ids are unique within a benchmark (a repeated id is a bad record).
    """
    spec = get_benchmark(name)
    read_row = ROW_READERS[spec.name]
    if skip_bad and bad is None:
        bad = BadRecords()
    release = find_release_files(spec.name, path, split)
    if release.note:
        log.warning("%s", release.note)
        if notes is not None:
            notes.append(release.note)
    out: list[Record] = []
    seen: set[str] = set()
    for f in release.files:
        ctx = _Ctx(spec, f)
        for i, row in iter_rows(f):
            try:
                rec = _read_row(read_row, row, i, ctx, seen)
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

