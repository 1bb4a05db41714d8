"""Trainer state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint's trainer state (optimizer and scheduler ``state_dict``s, RNG states, the data
position, a stage's extra values) is a tree of dicts, lists, tuples, numbers, strings, numpy
arrays and tensors. Unpickling a file runs whatever code its author put in it, so ``--resume``
must not unpickle; this module writes the tree as two files that only hold data:

- ``trainer_state.safetensors``: every tensor, under the path of keys that leads to it
  (``optimizer/state/0/exp_avg``);
- ``trainer_state.json``: the tree, each tensor replaced by ``{"__tensor__": key}``.

What JSON cannot say is tagged, so that the tree read back equals the tree written, types
included (an optimizer ``load_state_dict`` needs its int keys back, ``random.setstate`` its
tuples): ``{"__tuple__": [...]}``, ``{"__pairs__": [[key, value], ...]}`` for a dict with a
non-string key, ``{"__ndarray__": {"dtype", "shape", "data"}}`` for a small numpy array (numpy's
RNG state). Floats are written with ``repr``, which reads back to the same bits (NaN and inf
included, as JSON's ``NaN``/``Infinity``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = "prism-rl trainer state v1"
_TAGS = ("__tensor__", "__tuple__", "__pairs__", "__ndarray__")


class StateFormatError(ValueError):
    """A state file that does not hold what :func:`save_state` writes; the message says what."""


def save_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``trainer_state.json`` + ``trainer_state.safetensors`` in ``folder``."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors, set())
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": tree}))


def load_state(folder: str | Path) -> dict[str, Any]:
    """The tree :func:`save_state` wrote (tensors on the CPU); :class:`StateFormatError` when
    the files are not such a pair. Reads JSON and safetensors only: nothing in them is run."""
    folder = Path(folder)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (folder / name).is_file():
            raise StateFormatError(f"{name}: missing")
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{STATE_JSON}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), dict):
        raise StateFormatError(f"{STATE_JSON}: not a prism-rl trainer state (expected format {FORMAT!r})")
    try:
        tensors = load_file(str(folder / STATE_TENSORS), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise StateFormatError(f"{STATE_TENSORS}: not a readable safetensors file ({e})") from None
    try:
        return _decode(doc["state"], tensors)
    except StateFormatError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a hand-edited or forged tree
        raise StateFormatError(f"{STATE_JSON}: malformed ({type(e).__name__}: {e})") from None


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """``obj`` as JSON values; tensors go into ``tensors`` under their key path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        key = path.lstrip("/") or "tensor"
        while key in tensors:   # a key holding "/" can collide with a nested path
            key += "+"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"trainer state at {path or '/'}: numpy array of {obj.dtype} cannot be stored")
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        return {"__pairs__": [[_encode(k, f"{path}/key", tensors, seen), _encode(v, f"{path}/{k}", tensors, seen)]
                              for k, v in obj.items()]}
    raise TypeError(f"trainer state at {path or '/'}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise StateFormatError(f"{STATE_TENSORS}: no tensor {value!r} (named in {STATE_JSON})")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__pairs__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        return _array(value)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _array(spec: dict) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    if dtype.kind not in "biuf":
        raise StateFormatError(f"{STATE_JSON}: numpy array of dtype {dtype} is not allowed")
    return np.array(spec["data"], dtype=dtype).reshape(spec["shape"])
