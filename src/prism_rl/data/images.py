"""Image values -> :class:`ImageRef` -> pixels: the one finder and the one decoder for data
files, benchmark releases and chat requests.

Finding (:func:`image_ref`): a value may be a parquet image struct (``{"bytes", "path"}``),
raw bytes, a base64 ``data:`` URL, a path, or a ``file://`` URL. Callers differ in two
choices only:

* ``base_dirs``: the folders a relative path may resolve against, first match wins (a data
  file's folder; a benchmark file's folder and its two parents). A relative path must stay
  inside them, or inside a folder ``data.image_dirs`` names (:func:`configure_images`):
  ``../../etc/passwd`` is refused (the check is on the normalised path, so a symbolic link the
  user put inside the folder, e.g. ``images -> /mnt/big``, still works). An absolute path is
  taken as written: the data file names that file outright. ``None``:
  paths are refused (``prism serve``: a client must not name files on the server by path);
* ``file_url_dir``: the one folder ``file://`` URLs may read from (``prism serve
  --allow-file-urls DIR``); ``None`` (the default) refuses every ``file://`` URL. The URL's
  path is resolved (symbolic links included) and must be a regular file inside the folder;
  every refusal gives the same message, so a client cannot probe which files exist.

Decoding (:func:`open_image` for the header, :func:`decode_image` for the pixels): the size
in the header is checked against :class:`ImageLimits` before any pixel is decoded, so a
decompression bomb (a small file that decodes to gigabytes) costs nothing. Every failure, the
limits' included, raises :class:`ImageError` (a ``ValueError``); ``Record`` turns it into a
``DataError`` naming file, record and field, which ``data.skip_bad`` can skip.

A bad value raises :class:`~prism_rl.data.records.BadField` naming the caller's field; the
caller adds the file and record (readers) or answers a 400 (the server).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from ..config import DEFAULT_MAX_IMAGE_PIXELS, PIL_BOMB_PIXELS, QWEN_MAX_ASPECT_RATIO
from .errors import BadField

__all__ = ["DEFAULT_LIMITS", "DEFAULT_MAX_IMAGE_PIXELS", "FILE_URL_REFUSED", "MAX_FILE_URL_BYTES", "PIL_BOMB_PIXELS",
           "QWEN_MAX_ASPECT_RATIO", "ImageError", "ImageLimits", "ImageOutOfLimits", "ImageRef", "configure_images",
           "decode_image", "image_limits", "image_ref", "open_image", "set_image_dirs", "set_image_limits"]

MAX_FILE_URL_BYTES = 64 * 2**20  # a file:// URL must not make the server read a huge file
FILE_URL_REFUSED = ("this file:// URL cannot be read: the server reads file URLs only when started with "
                    "--allow-file-urls DIR, and then only regular files inside DIR")


class ImageError(ValueError):
    """An image that cannot be used: undecodable, or outside the :class:`ImageLimits`."""


class ImageOutOfLimits(ImageError):
    """An image whose header breaks one of the :class:`ImageLimits` (it is never decoded)."""


# --------------------------------------------------------------------------- limits

@dataclass(frozen=True)
class ImageLimits:
    """What an image may be, checked on the header before decoding.

    ``max_pixels``: width x height at most this (a hard cap, unlike ``data.max_pixels``, which
    resizes); ``max_aspect_ratio``: longer side / shorter side at most this; ``min_side``: the
    shorter side at least this. ``names`` are the settings messages name for the three
    (the ``data`` config keys by default).
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float = QWEN_MAX_ASPECT_RATIO
    min_side: int = 1
    names: tuple[str, str, str] = ("data.max_image_pixels", "data.max_image_aspect_ratio", "data.min_image_side")

    def check(self, width: int, height: int) -> None:
        """Raise :class:`ImageError` naming the first limit ``width x height`` breaks."""
        if width * height > self.max_pixels:
            raise ImageOutOfLimits(f"{width} x {height} = {width * height:,} pixels, over the limit of "
                             f"{self.max_pixels:,} ({self.names[0]}; refused before decoding)")
        short, long = min(width, height), max(width, height)
        if short < self.min_side:
            raise ImageOutOfLimits(f"{width} x {height}: the shorter side is under the limit of {self.min_side} "
                             f"pixels ({self.names[2]})")
        if long > self.max_aspect_ratio * short:
            raise ImageOutOfLimits(f"{width} x {height}: aspect ratio {long / short:.3g}:1 is over the limit of "
                             f"{self.max_aspect_ratio:g}:1 ({self.names[1]})")


DEFAULT_LIMITS = ImageLimits()
_limits = DEFAULT_LIMITS
_extra_dirs: tuple[str, ...] = ()


def set_image_limits(limits: ImageLimits) -> None:
    """Set the process-wide limits (each stage sets its ``data`` section's at start)."""
    global _limits
    _limits = limits


def set_image_dirs(dirs: Sequence[str | Path]) -> None:
    """Folders a relative image path may lead into besides its data file's (``data.image_dirs``)."""
    global _extra_dirs
    _extra_dirs = tuple(os.path.abspath(d) for d in dirs)


def configure_images(data_cfg: Any) -> None:
    """Apply a ``data`` config section's image settings process-wide: the limits and
    ``image_dirs``. Each stage calls it before it reads its data."""
    set_image_limits(image_limits(data_cfg))
    set_image_dirs(data_cfg.image_dirs)


def image_limits(data_cfg: Any = None) -> ImageLimits:
    """The limits a ``data`` config section names (``max_image_pixels``, ``max_image_aspect_ratio``,
    ``min_image_side``); without one, the process-wide limits in force."""
    if data_cfg is None:
        return _limits
    return ImageLimits(data_cfg.max_image_pixels, data_cfg.max_image_aspect_ratio, data_cfg.min_image_side)


# --------------------------------------------------------------------------- decoding

@dataclass
class ImageRef:
    """An image given either as encoded bytes or as a path (relative to ``base_dir``)."""

    data: bytes | None = None
    path: str | None = None
    base_dir: str | None = None

    def open(self) -> Image.Image:
        """The header, opened lazily and checked against the image limits (no pixels decoded);
        raises :class:`ImageError` (a ``ValueError``) on a bad or oversized image."""
        return open_image(self)

    def load(self) -> Image.Image:
        """Decode to an RGB PIL image (after ``open``'s checks); raises :class:`ImageError`."""
        return decode_image(self)


def _source(ref: ImageRef):
    if ref.data is not None:
        return io.BytesIO(ref.data)
    if ref.path is not None:
        p = Path(ref.path)
        return Path(ref.base_dir) / p if not p.is_absolute() and ref.base_dir is not None else p
    raise ImageError("image has neither bytes nor a path")


def open_image(ref: ImageRef, limits: ImageLimits | None = None) -> Image.Image:
    """The image's header, opened lazily (no pixels decoded) and checked against ``limits``
    (default: the process-wide ones); raises :class:`ImageError`."""
    limits = limits or _limits
    try:
        img = Image.open(_source(ref))
    except Image.DecompressionBombError as e:  # over Pillow's own cap, which is above ours
        raise ImageOutOfLimits(f"{e}; over the limit of {limits.max_pixels:,} ({limits.names[0]})") from None
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on bad files
        raise ImageError(_why(e)) from None
    try:
        limits.check(*img.size)
    except ImageError:
        img.close()
        raise
    return img


def decode_image(ref: ImageRef, limits: ImageLimits | None = None) -> Image.Image:
    """Decode to an RGB image after :func:`open_image`'s checks; raises :class:`ImageError`."""
    img = open_image(ref, limits)
    try:
        img.load()
        return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(_why(e)) from None
    finally:
        img.close()


def _why(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {text}"


# --------------------------------------------------------------------------- finding

def image_ref(value: Any, field: str, *, base_dirs: Sequence[str | Path] | None = None,
              file_url_dir: str | Path | None = None) -> ImageRef | None:
    """The image ``value`` names, or ``None`` when it is empty (``None``, empty bytes or text,
    a struct with neither bytes nor path); raises ``BadField(field, ...)`` when it is bad."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value)) if value else None
    if isinstance(value, dict):
        return _struct_ref(value, field, base_dirs)
    if isinstance(value, str):
        return _string_ref(value, field, base_dirs, file_url_dir)
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
                file_url_dir: str | Path | None) -> ImageRef | None:
    if not s:
        return None
    if s.startswith("data:"):
        return ImageRef(data=_data_url_bytes(s, field))
    if base_dirs is None:
        if s.lower().startswith("file:"):
            return ImageRef(data=_file_url_bytes(s, field, file_url_dir))
        # no remote fetching either: the server may have no network, and fetching arbitrary
        # URLs on a client's behalf is a request-forgery hole
        allowed = "base64 data: URLs" + (" and file:// URLs" if file_url_dir is not None else "")
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


def _file_url_bytes(url: str, field: str, root: str | Path | None) -> bytes:
    """The bytes of the regular file a ``file://`` URL names inside ``root``, resolved.

    Every refusal (file URLs off, a bad URL, outside ``root``, missing, not a regular file,
    unreadable) raises the same ``FILE_URL_REFUSED``, so the answer says nothing about which
    files exist. The file is read through the resolved path with ``O_NOFOLLOW``.
    """
    refused = BadField(field, FILE_URL_REFUSED)
    if root is None:
        raise refused
    parsed = urlparse(url)
    path = unquote(parsed.path)
    if parsed.netloc not in ("", "localhost") or not path.startswith("/") or "\0" in path:
        raise refused
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise refused
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise refused from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a folder; a FIFO or device would be read forever
            raise refused
        if st.st_size > MAX_FILE_URL_BYTES:
            raise BadField(field, f"the file is over {MAX_FILE_URL_BYTES // 2**20} MiB")
        chunks, left = [], MAX_FILE_URL_BYTES
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        raise refused from None
    finally:
        os.close(fd)


def _within(full: str, tops: list[str]) -> bool:
    return any(os.path.commonpath([full, top]) == top for top in tops)


def _path_ref(p: str, field: str, base_dirs: Sequence[str | Path] | None) -> ImageRef:
    """An absolute path, or one relative to the first of ``base_dirs`` that holds the file,
    normalised (``..`` parts folded) and refused when it leads outside all of them and outside
    the folders :func:`set_image_dirs` allows.

    Only existence is checked; the reference keeps the path as written (messages name it),
    or its normalised absolute form when it has ``..`` parts (so the file opened is the one
    checked, whatever symbolic links lie on the way)."""
    if base_dirs is None:
        raise BadField(field, f"image paths are not accepted here: {p}")
    if "\0" in p:
        raise BadField(field, "image path contains a NUL character")
    if Path(p).is_absolute():
        if Path(p).is_file():
            return ImageRef(path=p)
        raise BadField(field, f"image file not found: {p}")
    tops = [os.path.abspath(root) for root in base_dirs]
    candidates = [(root, os.path.normpath(os.path.join(top, p))) for root, top in zip(base_dirs, tops)]
    candidates = [(root, full) for root, full in candidates if _within(full, tops + list(_extra_dirs))]
    if not candidates:
        raise BadField(field, f"image path {p} leads outside the data file's folder {base_dirs[0]} (a relative "
                       "image path must stay inside it; name a file elsewhere by its absolute path, or allow "
                       "its folder with data.image_dirs)")
    for root, full in candidates:
        if os.path.isfile(full):
            return ImageRef(path=full) if ".." in Path(p).parts else ImageRef(path=p, base_dir=str(root))
    looked = f" (looked in {', '.join(map(str, base_dirs))})" if len(base_dirs) > 1 else ""
    raise BadField(field, f"image file not found: {p}{looked}")
