"""``manifest.json``: the size and SHA-256 of every file of a checkpoint, written at save and
checked before ``--resume`` trusts the folder.

A truncated or emptied weights file, a deleted config or tokenizer file, or random bytes
written into the weights (which would otherwise load and train silently into NaN) all show up
as a file that is missing, has another size or another hash. Every byte is hashed: it is what a
user expects from a checksum, and it costs one read of the checkpoint (SHA-256 runs at about
1-2 GB/s per core; files are hashed in parallel threads, as hashlib releases the GIL).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(folder: str | Path) -> Path:
    """Record every file under ``folder`` (sub-folders included) with its size and SHA-256."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    hashes = _hash_all(files)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": h} for p, h in zip(files, hashes)}
    path = folder / MANIFEST
    path.write_text(json.dumps({"files": entries}, indent=1))
    return path


def manifest_problem(folder: str | Path) -> str | None:
    """What is wrong with ``folder`` against its manifest (the first problem found, naming the
    file), or ``None`` when every listed file is there with its recorded size and hash."""
    folder = Path(folder)
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        listed = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in entries.items()]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not readable"
    root = folder.resolve()
    for name, size, _ in listed:
        path = folder / name
        if root not in path.resolve().parents:
            return f"{MANIFEST} names {name!r}, outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    for (name, _, want), got in zip(listed, _hash_all([folder / name for name, _, _ in listed])):
        if got != want:
            return f"{name} differs from what was saved (SHA-256 mismatch)"
    return None
