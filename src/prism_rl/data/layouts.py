"""Readers and writers for the on-disk data layouts, all normalised to :class:`Record`.

Layouts (METHOD.md section 3):

* **verl parquet** (alignment / RL / evaluation sets): columns ``data_source``, ``prompt``
  (chat messages, an ``<image>`` placeholder per image), ``images`` (``{"bytes": ...}``, or
  ``{"path": ...}`` relative to the parquet's folder on read), ``reward_model``
  (``{"style": "rule", "ground_truth": ...}``) and ``extra_info`` (``index``, ``split``,
  ``task``, ``question``, ``id``). Any other column (``teacher_caption``, ``teacher_cot``,
  ``teacher_response``, ``public_response``, ...) goes to ``Record.extra``; an optional
  ``response`` column is the SFT target.
* **ShareGPT JSON** (LLaMA-Factory multimodal SFT data): a JSON list of
  ``{"messages": [{"role", "content"}...], "images": [...]}`` or the older
  ``{"conversations": [{"from", "value"}...], "images": [...]}``. Images are paths relative to
  the JSON file's folder or ``data:image/...;base64,`` URLs. The final assistant message is
  ``Record.response``. Other top-level keys (``ground_truth``, ``task``, ``id``, extras) are
  carried.
* **JSONL**: one object per line, either ShareGPT shape, detected per line.
* **Discriminator warm-up pairs** (JSONL): ``question`` (or ``prompt``), ``image``,
  ``teacher_caption``, ``student_caption``, ``teacher_cot``, ``student_cot``; read into
  :class:`PairRecord`.

:func:`detect_layout` says which of these a file is, or which benchmark release (read by
``prism_rl.eval.loaders``, not here) it looks like, from its columns or keys alone.

Every record read gets ``source=str(path)`` and ``index`` = its position in the file, so any
later error can point back at it. Bad records raise :class:`DataError` naming the file, the
record index and the field; with ``skip_bad=True`` they are skipped and noted in a
:class:`BadRecords` instead. Images are not decoded here (``Record.load_images`` does that and
reports bad images); only the existence of image files is checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prism_rl.data.images import image_ref
from prism_rl.data.records import IMAGE_PLACEHOLDER, BadField, BadRecords, DataError, ImageRef, Record, report_bad
from prism_rl.format import SYSTEM_PROMPT

__all__ = [
    "Layout",
    "PairRecord",
    "detect_layout",
    "read_records",
    "read_verl_parquet",
    "read_sharegpt_json",
    "read_jsonl",
    "read_pairs",
    "write_records",
    "write_verl_parquet",
    "write_sharegpt_json",
    "write_jsonl",
    "write_pairs",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# ShareGPT "from" names (and the OpenAI names, which some exporters put there) -> roles.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}
_ROLE_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
# Top-level ShareGPT keys with a meaning of their own; every other key is an extra.
_SHAREGPT_KEYS = {"messages", "conversations", "images", "system", "ground_truth", "task", "id"}
# Parquet columns with a meaning of their own; every other column is an extra.
_VERL_COLUMNS = {"data_source", "prompt", "images", "reward_model", "extra_info", "response"}
# Extras written first (in this order) so teacher fields sit together in the file.
_TEACHER_FIELDS = ("teacher_caption", "teacher_cot", "teacher_response")
_PAIR_FIELDS = ("teacher_caption", "student_caption", "teacher_cot", "student_cot")


@dataclass
class PairRecord:
    """A discriminator warm-up pair: one prompt, the teacher's and the student's segments.

    ``*_caption`` is the caption segment and ``*_cot`` the think + answer segment of each
    response, as the discriminator scores them separately.
    """

    record: Record
    teacher_caption: str
    student_caption: str
    teacher_cot: str
    student_cot: str


@dataclass(frozen=True)
class Layout:
    """What a data file is. ``kind``: ``records`` (:func:`read_records` reads it), ``pairs``
    (:func:`read_pairs`) or ``benchmark`` (a benchmark's public release, ``benchmark`` naming
    it as ``prism eval --benchmark`` does); ``name`` says it in words."""

    kind: str
    name: str
    benchmark: str | None = None


# Benchmark releases by the columns that set each apart (first match wins; the loaders in
# prism_rl.eval.loaders list every column they read).
_BENCHMARK_COLUMNS = (
    ("hallusionbench", {"gt_answer"}),
    ("mathverse", {"problem_version"}),
    ("mathvista", {"pid", "choices"}),
    ("wemath", {"knowledge concept"}),
    ("mathvision", {"options", "level"}),
    ("mmmu", {"image_1", "options"}),
    ("mmmu_pro", {"image", "options", "answer"}),
)


# --------------------------------------------------------------------------- public API


def detect_layout(path: str | Path) -> Layout:
    """Which layout ``path`` holds, from its suffix and its first record's keys (a parquet
    file's columns): verl parquet (``prompt``), ShareGPT (``messages`` or ``conversations``),
    warm-up pairs (``teacher_caption`` and ``student_caption``) or a benchmark release (see
    ``_BENCHMARK_COLUMNS``). A file that is none of them raises :class:`DataError` listing its
    keys; an empty JSON list or JSONL file is ShareGPT with no records."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".json", ".jsonl"):
        raise DataError(f"{path}: unknown data file type (expected .parquet, .json or .jsonl)")
    keys = _first_keys(path, suffix)
    fmt = {".parquet": "parquet", ".json": "JSON", ".jsonl": "JSONL"}[suffix]
    if keys is None:
        return Layout("records", f"{fmt} with no records")
    if suffix == ".parquet" and "prompt" in keys:
        return Layout("records", "verl parquet")
    if suffix == ".jsonl" and {"teacher_caption", "student_caption"} <= keys:
        return Layout("pairs", "discriminator warm-up pairs (JSONL)")
    for shape in ("messages", "conversations"):
        if suffix != ".parquet" and shape in keys:
            return Layout("records", f"ShareGPT {fmt} ({shape})")
    for name, columns in _BENCHMARK_COLUMNS:
        if columns <= keys:
            return Layout("benchmark", f"{name} benchmark release ({fmt})", benchmark=name)
    raise DataError(f"{path}: not a layout prism reads (its {'columns' if fmt == 'parquet' else 'keys'}: "
                    f"{', '.join(sorted(keys)[:15])}); expected verl parquet (prompt, images, reward_model), "
                    "ShareGPT JSON/JSONL (messages or conversations), warm-up pairs or a benchmark release")


def _first_keys(path: Path, suffix: str) -> set[str] | None:
    """A parquet file's columns, or the keys of the first record of a JSON/JSONL file (a JSON
    dict of records, as MathVista's GitHub release, counts as a list); ``None`` when empty."""
    if suffix == ".parquet":
        _require_file(path)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
        return set(pf.schema_arrow.names) if pf.metadata.num_rows else None
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            data = list(data.values())
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        first = data[0] if data else None
    else:
        lines = _jsonl_lines(path)
        first = _parse_json_line(path, lines[0]) if lines else None
    if first is None:
        return None
    if not isinstance(first, dict):
        raise DataError(f"{path}, record 0: expected a JSON object, got {type(first).__name__}")
    return set(first)


def _parse_json_line(path: Path, item: tuple[int, str]) -> Any:
    try:
        return json.loads(item[1])
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, record {item[0]}: invalid JSON: {e}") from None


def read_records(path: str | Path, *, skip_bad: bool = False,
                 bad: BadRecords | None = None) -> list[Record]:
    """Read a ``.parquet`` (verl), ``.json`` (ShareGPT) or ``.jsonl`` file into records."""
    readers = {".parquet": read_verl_parquet, ".json": read_sharegpt_json, ".jsonl": read_jsonl}
    reader = readers.get(Path(path).suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type (expected .parquet, .json or .jsonl)")
    return reader(path, skip_bad=skip_bad, bad=bad)


def read_verl_parquet(path: str | Path, *, skip_bad: bool = False,
                      bad: BadRecords | None = None) -> list[Record]:
    """Read a verl-style parquet file (see module docstring for the columns)."""
    path = Path(path)
    _require_file(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    return _collect(enumerate(rows), path, lambda row, i: _verl_row(row, i, path), skip_bad, bad)


def read_sharegpt_json(path: str | Path, *, skip_bad: bool = False,
                       bad: BadRecords | None = None) -> list[Record]:
    """Read a ShareGPT JSON list (``messages`` or ``conversations`` shape, mixed is fine)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return _collect(enumerate(data), path, lambda obj, i: _sharegpt_obj(obj, i, path),
                    skip_bad, bad)


def read_jsonl(path: str | Path, *, skip_bad: bool = False,
               bad: BadRecords | None = None) -> list[Record]:
    """Read JSONL with one ShareGPT-shaped object per line (blank lines are ignored)."""
    path = Path(path)
    return _collect(_jsonl_lines(path), path,
                    lambda line, i: _sharegpt_obj(_parse_line(line), i, path), skip_bad, bad)


def read_pairs(path: str | Path, *, skip_bad: bool = False,
               bad: BadRecords | None = None) -> list[PairRecord]:
    """Read discriminator warm-up pairs (JSONL)."""
    path = Path(path)
    return _collect(_jsonl_lines(path), path,
                    lambda line, i: _pair_obj(_parse_line(line), i, path), skip_bad, bad)


def write_records(records: Sequence[Record], path: str | Path) -> None:
    """Write records in the layout ``path``'s suffix names: ``.parquet`` (verl), ``.json``
    (ShareGPT, images as files beside it) or ``.jsonl`` (images as data URLs). The ShareGPT
    layouts hold SFT data: a record without a response raises :class:`DataError` naming it."""
    writers = {".parquet": write_verl_parquet, ".json": write_sharegpt_json, ".jsonl": write_jsonl}
    writer = writers.get(Path(path).suffix.lower())
    if writer is None:
        raise DataError(f"{path}: unknown data file type (expected .parquet, .json or .jsonl)")
    writer(records, path)


def write_verl_parquet(records: Sequence[Record], path: str | Path) -> None:
    """Write records as verl parquet, images embedded as bytes.

    ``extra_info.index`` is the row's position in the written file.
    ``extra["split"]`` goes to ``extra_info.split``; every other extra key becomes a column
    (nulls where a record lacks it). A ``response`` column is written only if some record has
    a response.
    """
    path = Path(path)
    rows = [_verl_row_out(r, i) for i, r in enumerate(records)]
    extra_keys = _extra_columns(records)
    columns: dict[str, list[Any]] = {
        "data_source": [r["data_source"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "images": [r["images"] for r in rows],
        "reward_model": [r["reward_model"] for r in rows],
        "extra_info": [r["extra_info"] for r in rows],
    }
    fields = [
        pa.field("data_source", pa.string()),
        pa.field("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        pa.field("images", pa.list_(pa.struct([("bytes", pa.binary())]))),
        pa.field("reward_model", pa.struct([("style", pa.string()),
                                            ("ground_truth", pa.string())])),
        pa.field("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string()),
                                          ("task", pa.string()), ("question", pa.string()),
                                          ("id", pa.string())])),
    ]
    if any(r.response is not None for r in records):
        columns["response"] = [r.response for r in records]
        fields.append(pa.field("response", pa.string()))
    for key in extra_keys:
        values = [r.extra.get(key) for r in records]
        columns[key] = values
        # Strings get an explicit type so an all-null column still reads back as strings.
        if all(v is None or isinstance(v, str) for v in values):
            fields.append(pa.field(key, pa.string()))
        else:
            try:
                fields.append(pa.field(key, pa.array(values).type))
            except pa.ArrowException as e:
                raise DataError(f"{path}: extra field '{key}' cannot be a parquet column: {e}") from e
    table = pa.Table.from_pydict(columns, schema=pa.schema(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_sharegpt_json(records: Sequence[Record], path: str | Path,
                        image_dir: str = "images") -> None:
    """Write LLaMA-Factory ShareGPT JSON (``messages`` shape); images go to files.

    Image files are written under ``<json folder>/<image_dir>/`` named by a hash of their
    bytes (identical images are stored once) and referenced by relative path.
    """
    path = Path(path)
    objs = [_sharegpt_out(r, path.parent, image_dir) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(objs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_jsonl(records: Sequence[Record], path: str | Path,
                image_dir: str | None = None) -> None:
    """Write JSONL (``messages`` shape). ``image_dir=None`` embeds images as data URLs."""
    path = Path(path)
    lines = [json.dumps(_sharegpt_out(r, path.parent, image_dir), ensure_ascii=False)
             for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_pairs(pairs: Sequence[PairRecord], path: str | Path,
                image_dir: str | None = None) -> None:
    """Write warm-up pairs as JSONL. ``image_dir=None`` embeds images as data URLs."""
    path = Path(path)
    lines = []
    for p in pairs:
        rec = p.record
        images = [_image_out(ref, rec, path.parent, image_dir) for ref in rec.images]
        obj: dict[str, Any] = {
            "id": rec.id,
            "task": rec.task,
            "question": rec.question,
            "prompt": rec.messages,
            "image": images[0] if len(images) == 1 else (images or None),
        }
        if rec.ground_truth is not None:
            obj["ground_truth"] = rec.ground_truth
        obj.update({k: getattr(p, k) for k in _PAIR_FIELDS})
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --------------------------------------------------------------------------- reading helpers


def _collect(items: Iterable[tuple[int, Any]], path: Path, parse: Callable[[Any, int], Any],
             skip_bad: bool, bad: BadRecords | None) -> list:
    """Parse every item; a bad one raises DataError, or is skipped into ``bad``."""
    if skip_bad and bad is None:
        bad = BadRecords()
    out, skipped_before = [], bad.count if bad is not None else 0
    for i, raw in items:
        try:
            out.append(parse(raw, i))
        except BadField as e:
            report_bad(f"{path}, record {i}", e, skip_bad, bad)
    if bad is not None and bad.count > skipped_before:
        # Skipping is allowed, hiding it is not.
        log.warning("%s: skipped %d bad records (%s)", path, bad.count - skipped_before,
                    bad.summary())
    return out


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _load_json(path: Path) -> Any:
    _require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from e


def _jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines, numbered as records (record index = position among non-blank lines)."""
    _require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    return list(enumerate(line for line in text.splitlines() if line.strip()))


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadField("json", f"invalid JSON: {e}") from None


def _verl_row(row: dict[str, Any], i: int, path: Path) -> Record:
    """One parquet row -> Record."""
    messages = _messages(row.get("prompt"), "prompt")
    _need_user(messages, "prompt")
    images = _verl_images(row.get("images"), path.parent)
    _check_placeholders(messages, images)

    reward = row.get("reward_model")
    ground_truth = None
    if reward is not None:
        if not isinstance(reward, dict):
            raise BadField("reward_model", f"expected a dict, got {type(reward).__name__}")
        ground_truth = _ground_truth(reward.get("ground_truth"), "reward_model.ground_truth")

    info = row.get("extra_info")
    if info is not None and not isinstance(info, dict):
        raise BadField("extra_info", f"expected a dict, got {type(info).__name__}")
    info = info or {}
    source_name = row.get("data_source")
    task = info.get("task") or source_name or "default"
    if not isinstance(task, str):
        raise BadField("extra_info.task", f"expected a string, got {type(task).__name__}")

    response = row.get("response")
    if response is not None and not isinstance(response, str):
        raise BadField("response", f"expected a string, got {type(response).__name__}")
    extra = {k: v for k, v in row.items() if k not in _VERL_COLUMNS and v is not None}
    if info.get("split") is not None:
        extra["split"] = info["split"]
    return Record(id=_record_id(info.get("id"), path, i), messages=messages, images=images,
                  response=response, ground_truth=ground_truth, task=task, extra=extra,
                  source=str(path), index=i)


def _verl_images(value: Any, base_dir: Path) -> list[ImageRef]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadField("images", f"expected a list, got {type(value).__name__}")
    refs = []
    for k, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadField("images", f"image {k}: expected a dict with 'bytes' or 'path', "
                                     f"got {type(item).__name__}")
        ref = _image(item, k, "images", base_dir)
        if ref is None:
            raise BadField("images", f"image {k}: has neither 'bytes' nor 'path'")
        refs.append(ref)
    return refs


def _sharegpt_obj(obj: Any, i: int, path: Path) -> Record:
    """One ShareGPT object (either shape) -> Record."""
    if not isinstance(obj, dict):
        raise BadField("record", f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _messages(obj["messages"], "messages")
        field = "messages"
    elif "conversations" in obj:
        messages = _conversations(obj["conversations"])
        field = "conversations"
    else:
        raise BadField("messages", "missing (expected 'messages' or 'conversations')")
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise BadField("system", f"expected a string, got {type(system).__name__}")
        if not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})

    if not messages or messages[-1]["role"] != "assistant":
        raise BadField(field, "no final assistant message (SFT data needs a target response)")
    response = messages.pop()["content"]
    _need_user(messages, field)
    images = _string_images(obj.get("images"), path.parent)
    _check_placeholders(messages, images)

    task = obj.get("task", "default")
    if not isinstance(task, str):
        raise BadField("task", f"expected a string, got {type(task).__name__}")
    extra = {k: v for k, v in obj.items() if k not in _SHAREGPT_KEYS}
    return Record(id=_record_id(obj.get("id"), path, i), messages=messages, images=images,
                  response=response, ground_truth=_ground_truth(obj.get("ground_truth")),
                  task=task, extra=extra, source=str(path), index=i)


def _pair_obj(obj: Any, i: int, path: Path) -> PairRecord:
    """One warm-up pair object -> PairRecord (its record carries the prompt and image)."""
    if not isinstance(obj, dict):
        raise BadField("record", f"expected a JSON object, got {type(obj).__name__}")
    if "image" not in obj:
        raise BadField("image", "missing")
    image = obj["image"]
    images = _string_images([image] if isinstance(image, str) else image, path.parent, "image")

    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt")
    else:
        question, field = (obj.get("question"), "question") if "question" in obj \
            else (prompt, "prompt")
        if question is None:
            raise BadField("question", "missing (expected 'question' or 'prompt')")
        if not isinstance(question, str):
            raise BadField(field, f"expected a string, got {type(question).__name__}")
        # A bare question gets the standard system prompt and one placeholder per image.
        if IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER * len(images) + question
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question}]
    _need_user(messages, "prompt")
    _check_placeholders(messages, images)

    parts = {}
    for key in _PAIR_FIELDS:
        value = obj.get(key)
        if value is None:
            raise BadField(key, "missing")
        if not isinstance(value, str):
            raise BadField(key, f"expected a string, got {type(value).__name__}")
        parts[key] = value
    task = obj.get("task", "default")
    if not isinstance(task, str):
        raise BadField("task", f"expected a string, got {type(task).__name__}")
    skip = {"id", "task", "question", "prompt", "image", "ground_truth", *_PAIR_FIELDS}
    record = Record(id=_record_id(obj.get("id"), path, i), messages=messages, images=images,
                    ground_truth=_ground_truth(obj.get("ground_truth")), task=task,
                    extra={k: v for k, v in obj.items() if k not in skip},
                    source=str(path), index=i)
    return PairRecord(record=record, **parts)


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """Validate OpenAI-style messages; list-of-parts content is flattened to text."""
    if value is None:
        raise BadField(field, "missing")
    if not isinstance(value, list):
        raise BadField(field, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadField(field, f"message {k}: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise BadField(field, f"message {k}: role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(msg.get("content"), field, k)})
    return out


def _content(value: Any, field: str, k: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # OpenAI content parts: images become placeholders, in order, text is concatenated.
        text = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "image_url"):
                text.append(IMAGE_PLACEHOLDER)
            elif kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            else:
                raise BadField(field, f"message {k}: unsupported content part {part!r:.60}")
        return "".join(text)
    if value is None:
        raise BadField(field, f"message {k}: missing 'content'")
    raise BadField(field, f"message {k}: content is {type(value).__name__}, not a string")


def _conversations(value: Any) -> list[dict[str, str]]:
    """ShareGPT ``conversations`` (``from``/``value``) -> role/content messages."""
    if not isinstance(value, list):
        raise BadField("conversations", f"expected a list, got {type(value).__name__}")
    out = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadField("conversations", f"turn {k}: expected a dict, got {type(turn).__name__}")
        role = _SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise BadField("conversations", f"turn {k}: unknown 'from' {turn.get('from')!r}")
        content = turn.get("value")
        if not isinstance(content, str):
            raise BadField("conversations", f"turn {k}: 'value' is {type(content).__name__}, "
                                        "not a string")
        out.append({"role": role, "content": content})
    return out


def _need_user(messages: list[dict[str, str]], field: str) -> None:
    if not any(m["role"] == "user" for m in messages):
        raise BadField(field, "no user message")


def _check_placeholders(messages: list[dict[str, str]], images: list[ImageRef]) -> None:
    # A mismatch would silently drop or misplace an image in the processor, so reject it here.
    n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n != len(images):
        raise BadField("images", f"{len(images)} images but {n} '{IMAGE_PLACEHOLDER}' placeholders")


def _string_images(value: Any, base_dir: Path, field: str = "images") -> list[ImageRef]:
    """Images given as relative/absolute paths or ``data:image/...;base64,`` URLs."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadField(field, f"expected a list of strings, got {type(value).__name__}")
    refs = []
    for k, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise BadField(field, f"image {k}: expected a path or data URL, got {item!r:.60}")
        refs.append(_image(item, k, field, base_dir))
    return refs


def _image(value: Any, k: int, field: str, base_dir: Path) -> ImageRef | None:
    """Image ``k`` of a record; relative paths are relative to the data file's folder."""
    try:
        return image_ref(value, field, base_dirs=(base_dir,))
    except BadField as e:
        raise BadField(field, f"image {k}: {e.why}") from None


def _ground_truth(value: Any, field: str = "ground_truth") -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Some public sets store numeric answers as numbers; the reward compares strings.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadField(field, f"expected a string, got {type(value).__name__}")


def _record_id(value: Any, path: Path, i: int) -> str:
    if value is None or value == "":
        return f"{path.stem}-{i}"
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise BadField("id", f"expected a string, got {type(value).__name__}")


# --------------------------------------------------------------------------- writing helpers


def _verl_row_out(rec: Record, position: int) -> dict[str, Any]:
    return {
        "data_source": rec.task,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in rec.messages],
        "images": [{"bytes": _image_bytes(ref, rec)} for ref in rec.images],
        "reward_model": {"style": "rule", "ground_truth": rec.ground_truth},
        "extra_info": {"index": position, "split": rec.extra.get("split"), "task": rec.task,
                       "question": rec.question, "id": rec.id},
    }


def _extra_columns(records: Sequence[Record]) -> list[str]:
    keys = {k for r in records for k in r.extra if k != "split" and k not in _VERL_COLUMNS}
    first = [k for k in _TEACHER_FIELDS if k in keys]
    return first + sorted(keys - set(first))


def _sharegpt_out(rec: Record, folder: Path, image_dir: str | None) -> dict[str, Any]:
    if rec.response is None:
        raise DataError(f"{rec.where('response')}: ShareGPT layouts hold SFT data, which needs a response "
                        "(write prompt-only records as .parquet)")
    obj: dict[str, Any] = {
        "id": rec.id,
        "messages": [*({"role": m["role"], "content": m["content"]} for m in rec.messages),
                     {"role": "assistant", "content": rec.response}],
        "images": [_image_out(ref, rec, folder, image_dir) for ref in rec.images],
        "task": rec.task,
    }
    if rec.ground_truth is not None:
        obj["ground_truth"] = rec.ground_truth
    # Extras ride along as top-level keys (LLaMA-Factory ignores columns it does not map).
    obj.update({k: v for k, v in rec.extra.items() if k not in _SHAREGPT_KEYS})
    return obj


def _image_out(ref: ImageRef, rec: Record, folder: Path, image_dir: str | None) -> str:
    """A data URL (``image_dir=None``) or a path relative to ``folder`` of a written file."""
    data = _image_bytes(ref, rec)
    ext, mime = _sniff(data)
    if image_dir is None:
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    # Content-addressed names: deterministic, and an image shared by records is stored once.
    rel = f"{image_dir}/{hashlib.sha1(data).hexdigest()[:20]}{ext}"
    target = folder / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return rel


def _image_bytes(ref: ImageRef, rec: Record) -> bytes:
    if ref.data is not None:
        return ref.data
    if ref.path is None:
        raise DataError(f"{rec.where('images')}: image has neither bytes nor a path")
    p = Path(ref.path)
    if not p.is_absolute() and ref.base_dir is not None:
        p = Path(ref.base_dir) / p
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"{rec.where('images')}: cannot read image {ref.path}: {e}") from e


def _sniff(data: bytes) -> tuple[str, str]:
    """(extension, MIME type) from the magic bytes; PNG when unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg", "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ".gif", "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp", "image/webp"
    if data.startswith(b"BM"):
        return ".bmp", "image/bmp"
    return ".png", "image/png"
