"""Where evaluation results live, so that every run's results stay and a rerun resumes.

::

    <root>/                      --out (default runs/eval): every evaluation run, plus the
      results.md .csv .png .json   comparison table of all of them (``prism_rl.eval.report``)
      <run>/                     one model: --name, or a name derived from the model's path
        run.json                 the model's resolved path (a different model may not write here)
        <part>/                  a benchmark key (``mathvista``, ...) or ``heldout-<file stem>``
          meta.json              the settings the samples were made with
          samples.jsonl          one line per finished sample, appended batch by batch
          summary.json           the scores (with the model's resolved path)

A rerun of the same model and part skips what ``samples.jsonl`` already holds; other
sampling settings are refused (``--fresh`` starts the part over). Only this module decides
paths; the held-out and benchmark evaluations both call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..config import ConfigError

__all__ = ["RUN_FILE", "atomic_write", "claim_run", "derive_run_name", "heldout_part", "model_id", "prepare_part",
           "read_rows"]

RUN_FILE = "run.json"
# folder names that say nothing about which model it is: the name takes its parents' too
_GENERIC = re.compile(r"(final|policy|actor|model|hf|huggingface|latest|best|last|merged|"
                      r"(global[-_]?)?(checkpoint|ckpt|step)[-_]?\d*)", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_PARTS = 4


def model_id(model: str | Path) -> str:
    """A model's identity in the results: its absolute, symlink-resolved path."""
    return str(Path(model).expanduser().resolve())


def derive_run_name(model: str | Path) -> str:
    """A readable run name from the model's path: the last folder name, preceded by its
    parents' names while those so far are generic (``final``, ``policy``, ``checkpoint-40``):
    ``runs/rl/final`` -> ``rl-final``, ``runs/q/align/final/policy`` -> ``align-final-policy``,
    ``models/Qwen3-VL-4B-Instruct`` -> ``Qwen3-VL-4B-Instruct``."""
    names: list[str] = []
    for part in reversed(Path(model_id(model)).parts[1:]):
        names.insert(0, part)
        if not _GENERIC.fullmatch(part) or len(names) == _MAX_PARTS:
            break
    return _UNSAFE.sub("_", "-".join(names)).strip("._") or "model"


def _check_name(name: str) -> None:
    if not name.strip() or name.startswith(".") or "/" in name or "\\" in name:
        raise ConfigError(f"run name {name!r} (--name / name=): it must be one folder name, "
                          f"without '/' and not starting with '.'")


def _owner(run_dir: Path) -> str | None:
    """The model whose results ``run_dir`` holds (``None``: a new or unclaimed folder)."""
    p = run_dir / RUN_FILE
    if not p.exists():
        return None
    try:
        return str(json.loads(p.read_text())["model"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{p}: not a run file (expected JSON with 'model'); remove it or pick another --name") from None


def claim_run(root: str | Path, name: str | None, model: str | Path) -> tuple[str, Path]:
    """``(run name, run folder)`` for ``model`` under ``root``; records the model in
    ``run.json`` on first use.

    With ``name`` given, a folder holding another model's results is an error. Without, the
    derived name is used, or, when that folder belongs to another model (two ``.../rl/final``
    in different places), the derived name plus a short hash of the model's path.
    """
    mid = model_id(model)
    if name:
        _check_name(name)
        candidates = [name]
    else:
        base = derive_run_name(mid)
        candidates = [base, f"{base}-{hashlib.sha1(mid.encode()).hexdigest()[:6]}"]
    root = Path(root)
    for cand in candidates:
        run_dir = root / cand
        owner = _owner(run_dir)
        if owner is None or owner == mid:
            run_dir.mkdir(parents=True, exist_ok=True)
            if owner is None:
                atomic_write(run_dir / RUN_FILE, json.dumps({"name": cand, "model": mid}, indent=2))
            return cand, run_dir
    raise ConfigError(f"{root / candidates[-1]}: holds results of model {owner} ({RUN_FILE}), "
                      f"not of {mid}; pass another --name, or remove that folder")


def heldout_part(data: str | Path) -> str:
    """The part folder of a held-out file: ``heldout-<file stem>``."""
    return "heldout-" + (_UNSAFE.sub("_", Path(data).stem).strip("._") or "data")


def prepare_part(part_dir: Path, meta: dict, compare: tuple[str, ...], fresh: bool) -> None:
    """Make ``part_dir`` ready: with ``fresh``, delete its samples and summary; otherwise
    refuse to add samples made with other settings (the keys ``compare``) than the ones
    there. Writes ``meta``."""
    meta_path, samples = part_dir / "meta.json", part_dir / "samples.jsonl"
    if fresh:
        for f in (samples, part_dir / "summary.json"):
            f.unlink(missing_ok=True)
    elif meta_path.exists() and samples.exists():
        old = json.loads(meta_path.read_text())
        diff = [f"{k} {old.get(k)!r} there, {meta.get(k)!r} now" for k in compare if old.get(k) != meta.get(k)]
        if diff:
            raise ConfigError(f"{samples}: holds samples made with other settings ({'; '.join(diff)}); "
                              f"rerun with --fresh to start {part_dir.name} over, or pass another --name")
    part_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(meta_path, json.dumps(meta, indent=2))


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``samples.jsonl``, in file order; a torn last line (an interrupted
    write) is cut from the file so that appends start on a fresh line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    rows = []
    for line in data.decode("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write through a temporary file of this process: evaluations running side by side (the
    quick start's lanes) may rewrite one file at once, and a reader sees one whole version."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
