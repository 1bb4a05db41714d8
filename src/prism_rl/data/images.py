"""Image values -> :class:`ImageRef`: the one decoder for data files, benchmark releases and
chat requests.

A value may be a parquet image struct (``{"bytes", "path"}``), raw bytes, a base64 ``data:``
URL, a path, or a ``file://`` URL. Callers differ in two choices only:

* ``base_dirs``: the folders a relative path may resolve against, first match wins (a data
  file's folder; a benchmark file's folder and its two parents). ``None``: paths are refused
  (``prism serve``: a client must not name files on the server by path);
* ``allow_file_urls``: whether ``file://`` URLs are read (``prism serve`` only).

A bad value raises :class:`~prism_rl.data.records.BadField` naming the caller's field; the
caller adds the file and record (readers) or answers a 400 (the server). Images are not
decoded here, only found (``ImageRef.load`` decodes).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from .records import BadField, ImageRef

__all__ = ["MAX_FILE_URL_BYTES", "image_ref"]

MAX_FILE_URL_BYTES = 64 * 2**20  # a file:// URL must not make the server read a huge file


def image_ref(value: Any, field: str, *, base_dirs: Sequence[str | Path] | None = None,
              allow_file_urls: bool = False) -> ImageRef | None:
    """The image ``value`` names, or ``None`` when it is empty (``None``, empty bytes or text,
    a struct with neither bytes nor path); raises ``BadField(field, ...)`` when it is bad."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value)) if value else None
    if isinstance(value, dict):
        return _struct_ref(value, field, base_dirs)
    if isinstance(value, str):
        return _string_ref(value, field, base_dirs, allow_file_urls)
    raise BadField(field, f"unsupported image value of type {type(value).__name__}")


def _struct_ref(value: dict, field: str, base_dirs: Sequence[str | Path] | None) -> ImageRef | None:
    """A parquet image struct: its bytes when present, else its path."""
    data, path = value.get("bytes"), value.get("path")
    if data is not None and not isinstance(data, (bytes, bytearray)):
        raise BadField(field, f"'bytes' is {type(data).__name__}, not bytes")
    if data:
        return ImageRef(data=bytes(data))
    if isinstance(path, str) and path:
        return _path_ref(path, field, base_dirs)
    return None


def _string_ref(s: str, field: str, base_dirs: Sequence[str | Path] | None,
                allow_file_urls: bool) -> ImageRef | None:
    if not s:
        return None
    if s.startswith("data:"):
        return ImageRef(data=_data_url_bytes(s, field))
    if allow_file_urls and s.startswith("file:"):
        return ImageRef(data=_file_url_bytes(s, field))
    if base_dirs is None:
        # no remote fetching either: the server may have no network, and fetching arbitrary
        # URLs on a client's behalf is a request-forgery hole
        allowed = "base64 data: URLs" + (" and file:// URLs" if allow_file_urls else "")
        raise BadField(field, f"only {allowed} are supported")
    return _path_ref(s, field, base_dirs)


def _data_url_bytes(url: str, field: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadField(field, "must be a base64 data URL (data:image/png;base64,...)")
    try:
        # whitespace is dropped: MIME encoders wrap base64 text into lines
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadField(field, f"bad base64 in data URL: {e}") from None


def _file_url_bytes(url: str, field: str) -> bytes:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise BadField(field, "file URLs must name a local file (file:///abs/path)")
    path = Path(url2pathname(parsed.path))
    if not path.is_absolute():
        raise BadField(field, "file URLs need an absolute path")
    # is_file(): a device such as /dev/zero would be read forever
    if not path.is_file():
        raise BadField(field, f"cannot read {path}: not an existing regular file")
    if path.stat().st_size > MAX_FILE_URL_BYTES:
        raise BadField(field, f"{path} is over {MAX_FILE_URL_BYTES // 2**20} MiB")
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadField(field, f"cannot read {path}: {e.strerror}") from None


def _path_ref(p: str, field: str, base_dirs: Sequence[str | Path] | None) -> ImageRef:
    """An absolute path, or one relative to the first of ``base_dirs`` that holds the file.

    Only existence is checked; the reference keeps the path as written (messages name it)."""
    if base_dirs is None:
        raise BadField(field, f"image paths are not accepted here: {p}")
    if Path(p).is_absolute():
        if Path(p).is_file():
            return ImageRef(path=p)
        raise BadField(field, f"image file not found: {p}")
    for root in base_dirs:
        if (Path(root) / p).is_file():
            return ImageRef(path=p, base_dir=str(root))
    looked = f" (looked in {', '.join(map(str, base_dirs))})" if len(base_dirs) > 1 else ""
    raise BadField(field, f"image file not found: {p}{looked}")
