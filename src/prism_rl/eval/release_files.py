"""A benchmark's downloaded folder as it ships: which files to read, and images inside zips.

Releases often hold one split twice: the MathVerse repository ships ``testmini.parquet`` (images
inside) and ``testmini.json`` (image paths into ``images.zip``); the WeMath one ships
``testmini.json`` next to a zip of its images, which once unpacked may bring a second copy.
Reading both gives every record twice. :func:`choose_files` reads one representation only:
for a benchmark whose split is one file (``BenchmarkSpec.one_folder``), the files found are
grouped by (kind, folder) and the first group in this order is read:

    parquet before JSON/JSONL (parquet carries its images), then the shallowest folder,
    then the folder name;

the others are named in the returned note (MMMU and MMMU-Pro spread a split over several
folders, so all of theirs are read). :func:`zipped_image` finds an image path that is not on
disk inside a ``.zip`` next to the data file (or one or two folders up), so a folder works
before its image archive is unpacked.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError
from ..data.records import BadField, DataError
from .benchmark_table import BenchmarkSpec, get_benchmark

__all__ = ["ReleaseFiles", "benchmark_files", "choose_files", "find_release_files", "iter_rows", "zipped_image",
           "zips_in"]

DATA_SUFFIXES = (".parquet", ".json", ".jsonl")


@dataclass(frozen=True)
class ReleaseFiles:
    """The files to read and, when some were left unread, a sentence saying which and why."""

    files: list[Path]
    skipped: list[Path]
    note: str = ""


def _globs(spec: BenchmarkSpec, split: str | None) -> tuple[str, ...]:
    """The spec's file patterns, for another split when one is asked for (MathVision ``test``)."""
    if split is None or split == spec.split:
        return spec.file_globs
    if not any(spec.split in g for g in spec.file_globs):
        raise ConfigError(f"{spec.name}: no other split than {spec.split!r} can be chosen by name; "
                          f"pass the data file itself")
    return tuple(g.replace(spec.split, split) for g in spec.file_globs)


def _group_key(f: Path, root: Path) -> tuple[int, int, str]:
    """Order of preference: parquet first, then the shallowest folder, then its name."""
    kind = 0 if f.suffix.lower() == ".parquet" else 1
    rel = f.parent.relative_to(root) if f.is_relative_to(root) else f.parent
    return kind, len(rel.parts), str(rel)


def choose_files(spec: BenchmarkSpec, found: list[Path], root: Path) -> ReleaseFiles:
    """One representation of a one-file split: the files of the preferred (kind, folder) group
    (module docstring); every file for a benchmark spread over folders."""
    if not spec.one_folder or len(found) <= 1:
        return ReleaseFiles(list(found), [])
    groups: dict[tuple, list[Path]] = {}
    for f in found:
        groups.setdefault(_group_key(f, root), []).append(f)
    best = min(groups)
    files = groups[best]
    skipped = [f for f in found if f not in files]
    if not skipped:
        return ReleaseFiles(files, [])
    why = "parquet carries its images" if best[0] == 0 and any(f.suffix != ".parquet" for f in skipped) \
        else "the shallowest copy"
    note = (f"{spec.name}: reading {', '.join(map(str, files))} ({why}); not reading "
            f"{', '.join(map(str, skipped))}: the same split in another form")
    return ReleaseFiles(files, skipped, note)


def find_release_files(name: str, path: str | Path, split: str | None = None) -> ReleaseFiles:
    """The data files to read: ``path`` itself, or one representation of the split's files
    under a folder (the benchmark's default split unless ``split`` names another)."""
    spec = get_benchmark(name)
    p = Path(path)
    if p.is_file():
        return ReleaseFiles([p], [])
    if not p.is_dir():
        raise DataError(f"{p}: no such file or folder (data for {spec.name})")
    globs = _globs(spec, split)
    found: list[Path] = []
    for pattern in globs:
        for f in sorted(p.glob(pattern)):
            if f.is_file() and f.suffix.lower() in DATA_SUFFIXES and f not in found:
                found.append(f)
    if not found:
        raise DataError(f"{p}: no {spec.name} {split or spec.split} files found (looked for "
                        f"{', '.join(globs)}); pass the data file itself")
    return choose_files(spec, found, p)


def benchmark_files(name: str, path: str | Path, split: str | None = None) -> list[Path]:
    """The files :func:`find_release_files` chooses."""
    return find_release_files(name, path, split).files


# --------------------------------------------------------------------------- rows


def _json_rows(data: Any, path: Path) -> list[Any]:
    """Rows of a JSON file: a list, or a dict keyed by id (MathVista's GitHub JSON)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [dict(v, _key=k) for k, v in data.items()]
    raise DataError(f"{path}: expected a JSON list of records or a dict of records")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet file: {e}") from e


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
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


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(index, row)`` pairs of a parquet, JSON or JSONL file; a row that cannot be parsed
    comes as a ``BadField``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read JSON: {e}") from e
        yield from enumerate(_json_rows(data, path))
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        raise DataError(f"{path}: unknown data file type (expected {', '.join(DATA_SUFFIXES)})")


# --------------------------------------------------------------------------- zipped images


def _zip_index(folder: str) -> dict[str, tuple[str, str] | None]:
    """The index of the zips in ``folder`` as they are now (a changed zip is indexed again)."""
    stamps = []
    for z in zips_in([Path(folder)]):
        st = z.stat()
        stamps.append((str(z), st.st_mtime_ns, st.st_size))
    return _index_of(tuple(stamps))


@lru_cache(maxsize=64)
def _index_of(zips: tuple[tuple[str, int, int], ...]) -> dict[str, tuple[str, str] | None]:
    """Every path suffix of every member of ``zips`` -> (zip, member); ``None`` marks a suffix
    two members share (ambiguous, so never used)."""
    index: dict[str, tuple[str, str] | None] = {}
    for z, _, _ in zips:
        try:
            with zipfile.ZipFile(z) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError):
            continue
        for n in names:
            parts = n.split("/")
            for i in range(len(parts)):
                key = "/".join(parts[i:])
                index[key] = None if key in index and index[key] != (str(z), n) else (str(z), n)
    return index


def zipped_image(path: str, dirs: Sequence[Path]) -> tuple[bytes, str] | None:
    """The bytes of image ``path`` found in a zip in one of ``dirs`` (first folder first), and
    ``zip!member`` naming it; ``None`` when no zip holds it (or two members match)."""
    key = path.strip().replace("\\", "/").removeprefix("./")
    for d in dirs:
        hit = _zip_index(str(d)).get(key)
        if hit is not None:
            with zipfile.ZipFile(hit[0]) as zf:
                return zf.read(hit[1]), f"{hit[0]}!{hit[1]}"
    return None


def zips_in(dirs: Sequence[Path]) -> list[Path]:
    """The ``.zip`` files in ``dirs`` (for an error message that names them)."""
    return [z for d in dirs for z in sorted(Path(d).glob("*.zip"))]
