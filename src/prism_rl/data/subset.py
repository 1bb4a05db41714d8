"""A subset of a data file's rows, written as they were read, plus columns of the caller's.

A job that selects problems (the difficulty filter) must hand on what it was given: every
column of a kept row, nested values included, plus its own columns. Re-serialising
``Record``s would not do that: the verl writer rebuilds ``extra_info`` (dropping keys it does
not know, such as ``answer``) and derives columns from what is left. So rows are taken from
the source file again, by ``Record.index`` (the row's position in the file), and written in
the source's own layout:

* ``.parquet``: the source table's rows (``pyarrow.Table.take``), so the schema is the
  source's even when no row is kept; an added column replaces a source column of its name;
* ``.json`` (a list of objects) and ``.jsonl`` (one object a line): the objects, with the added
  keys set.

The one value that may change is a relative image path when the output lies in another
folder: it is re-based so that it still names the same file (paths are relative to the data
file's folder), and made absolute when the relative form would lead out of the output's folder
(readers refuse that). Image bytes and data URLs are never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .records import DataError

__all__ = ["write_subset"]

_ARROW_TYPES = {float: pa.float64(), int: pa.int64(), str: pa.string(), bool: pa.bool_()}


def write_subset(src: str | Path, out: str | Path, rows: Sequence[int],
                 added: dict[str, tuple[type, Sequence[Any]]]) -> None:
    """Write rows ``rows`` of ``src`` to ``out`` (same layout), each with the ``added`` columns.

    ``added`` maps a column name to ``(python type, values)``, one value per written row;
    the type fixes the parquet column type even when no row is written.
    """
    src, out = Path(src), Path(out)
    if out.suffix.lower() != src.suffix.lower():
        raise DataError(f"{out}: the output keeps the input's rows as they are, so it must be a "
                        f"{src.suffix} file like the input {src}")
    for name, (_kind, values) in added.items():
        if len(values) != len(rows):
            raise ValueError(f"column {name!r}: {len(values)} values for {len(rows)} rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    moved = src.parent.resolve() != out.parent.resolve()
    if src.suffix.lower() == ".parquet":
        _write_parquet(src, out, rows, added, moved)
    elif src.suffix.lower() in (".json", ".jsonl"):
        _write_json(src, out, rows, added, moved)
    else:
        raise DataError(f"{src}: unknown data file type (expected .parquet, .json or .jsonl)")


def _write_parquet(src: Path, out: Path, rows: Sequence[int], added: dict, moved: bool) -> None:
    table = pq.read_table(src).take(pa.array(rows, type=pa.int64()))
    if moved and "images" in table.column_names:
        table = _rebase_parquet_images(table, src.parent, out.parent)
    for name, (kind, values) in added.items():
        column = pa.array(list(values), type=_ARROW_TYPES[kind])
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    pq.write_table(table, out)


def _rebase_parquet_images(table: pa.Table, src_dir: Path, out_dir: Path) -> pa.Table:
    """``images[k].path`` (used when ``bytes`` is empty) re-based from ``src_dir`` to ``out_dir``."""
    images = table.column("images").to_pylist()
    changed = False
    for row in images:
        for item in row or []:
            if isinstance(item, dict) and not item.get("bytes") and isinstance(item.get("path"), str):
                new = _rebased(item["path"], src_dir, out_dir)
                changed |= new != item["path"]
                item["path"] = new
    if not changed:
        return table
    i = table.column_names.index("images")
    return table.set_column(i, table.schema.field(i), pa.array(images, type=table.schema.field(i).type))


def _write_json(src: Path, out: Path, rows: Sequence[int], added: dict, moved: bool) -> None:
    objs = [dict(o) for o in _json_objects(src, rows)]
    for k, obj in enumerate(objs):
        if moved and isinstance(obj.get("images"), list):
            obj["images"] = [_rebased(v, src.parent, out.parent) if isinstance(v, str) else v
                             for v in obj["images"]]
        for name, (_kind, values) in added.items():
            obj[name] = values[k]
    if src.suffix.lower() == ".json":
        out.write_text(json.dumps(objs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        out.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")


def _json_objects(src: Path, rows: Sequence[int]) -> list[Any]:
    """The objects at ``rows`` of a JSON list or of a JSONL file (positions among non-blank lines,
    as the readers number records)."""
    text = src.read_text(encoding="utf-8")
    if src.suffix.lower() == ".json":
        items = json.loads(text)
        return [items[i] for i in rows]
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(lines[i]) for i in rows]


def _rebased(path: str, src_dir: Path, out_dir: Path) -> str:
    """A path relative to ``src_dir``, made relative to ``out_dir``, or absolute when that would
    climb out of ``out_dir`` (readers refuse relative image paths that leave the data file's
    folder); URLs and absolute paths as they are."""
    if not path or path.startswith("data:") or "://" in path or Path(path).is_absolute():
        return path
    rel = os.path.relpath(src_dir / path, out_dir)
    return os.path.abspath(src_dir / path) if rel.split(os.sep)[0] == os.pardir else rel
