"""The one in-memory record every data layout is read into.

Readers (``prism_rl.data.layouts``) turn verl parquet, ShareGPT JSON and JSONL files into
``Record`` objects; the processing code (``prism_rl.data.processing``) turns records into model
batches. A record remembers the file and index it came from, so that every error about it can
name both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import BadField, DataError
from .images import ImageRef

__all__ = ["IMAGE_PLACEHOLDER", "BadField", "BadRecords", "DataError", "ImageRef", "Record", "report_bad"]

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Record:
    """One problem (and optionally its target response).

    ``messages`` are the prompt's chat messages (system and user turns, no final assistant
    turn); an ``<image>`` placeholder in a message's content marks where an image goes,
    in order. ``response`` is the assistant target for SFT (``None`` for prompt-only data).
    ``extra`` holds layout-specific fields such as ``teacher_caption``, ``teacher_cot``,
    ``teacher_response`` and ``public_response``.
    """

    id: str
    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    response: str | None = None
    ground_truth: str | None = None
    task: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    index: int = -1

    def where(self, field_name: str | None = None) -> str:
        """``file, record N[, field F]`` for error messages."""
        loc = f"{self.source}, record {self.index}"
        return f"{loc}, field '{field_name}'" if field_name else loc

    def load_images(self) -> list[Image.Image]:
        """Decode every image; a missing, corrupt or oversized one (see
        :class:`~prism_rl.data.images.ImageLimits`) raises ``DataError`` naming it."""
        return [self._image(i, ImageRef.load) for i in range(len(self.images))]

    def check_images(self) -> None:
        """Open every image's header (no decoding); a missing, unreadable or oversized one raises
        ``DataError``."""
        for i in range(len(self.images)):
            self._image(i, ImageRef.open).close()

    def _image(self, i: int, how) -> Image.Image:
        ref = self.images[i]
        try:
            return how(ref)
        except (OSError, ValueError) as e:
            name = ref.path if ref.path is not None else f"bytes #{i}"
            raise DataError(f"{self.where('images')}: cannot load image {name}: {e}") from e

    @property
    def question(self) -> str:
        """The last user message's text without image placeholders."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1].replace(IMAGE_PLACEHOLDER, "").strip() if users else ""


@dataclass
class BadRecords:
    """Skipped-record bookkeeping for ``data.skip_bad=true``: nothing is dropped silently.

    ``add`` records where and why; ``summary()`` is what a run logs at the end of loading.
    """

    reasons: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.reasons.append(f"{where}: {why}")

    @property
    def count(self) -> int:
        return len(self.reasons)

    def summary(self, limit: int = 5) -> str:
        if not self.reasons:
            return "0 bad records skipped"
        shown = "; ".join(self.reasons[:limit])
        more = f" (+{self.count - limit} more)" if self.count > limit else ""
        return f"{self.count} bad records skipped: {shown}{more}"


def report_bad(where: str, err: BadField, skip_bad: bool, bad: BadRecords | None) -> None:
    """The ``skip_bad`` policy for a record that failed to parse: raise a ``DataError`` naming
    ``where`` (file and record) and the field, or note it in ``bad``."""
    loc = f"{where}, field '{err.field}'"
    if not skip_bad:
        raise DataError(f"{loc}: {err.why}") from None
    bad.add(loc, err.why)
