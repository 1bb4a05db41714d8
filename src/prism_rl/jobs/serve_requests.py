"""``prism serve``'s request side: OpenAI-shaped errors, the request model, and chat messages
-> a training ``Record`` with its images found, size-checked and decoded.

Every error is an :class:`APIError` answered as ``{"error": {message, type, param, code}}``.
Images come only from base64 ``data:`` URLs, or ``file://`` URLs inside the one folder
``--allow-file-urls DIR`` names (off by default; every refusal reads the same, see
:func:`prism_rl.data.images.image_ref`). Their headers are read first: the request's images
together may hold at most ``max_image_pixels`` pixels (a 400 naming the limit), checked before
any of them is decoded.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..data.images import (
    PIL_BOMB_PIXELS,
    QWEN_MAX_ASPECT_RATIO,
    ImageError,
    ImageLimits,
    ImageOutOfLimits,
    decode_image,
    image_ref,
    open_image,
)
from ..data.records import IMAGE_PLACEHOLDER, BadField, ImageRef, Record

MAX_N = 128                      # OpenAI's own limit on choices per request
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1   # what torch.manual_seed accepts
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters we cannot honour: silently ignoring them would return something the caller
# did not ask for, so they are refused.
UNSUPPORTED = ("stream", "logprobs", "top_logprobs", "tools", "functions")


# --------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"message": _printable(self.message), "type": self.type, "param": _printable(self.param),
                "code": self.code}
        return JSONResponse(status_code=self.status, content={"error": body}, headers=self.headers)


def _printable(text: str | None) -> str | None:
    """``text`` with any lone surrogate (from a client's ``\\ud800`` escape, quoted back in a
    message) written as its escape: the response must encode as UTF-8."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI/pydantic body errors -> one 400 naming the parameter(s)."""
    parts, params = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"The request body is not valid JSON: {err.get('msg')}")
            continue
        param = ".".join(loc) or None
        params.append(param)
        parts.append(f"Invalid value for '{param}': {err.get('msg')}" if param else str(err.get("msg")))
    return bad_request("; ".join(parts) or "Invalid request.", params[0] if params else None)


# --------------------------------------------------------------------------- the request

class ChatRequest(BaseModel):
    """The chat-completions parameters we use; other fields (``user``, ``metadata``...) are
    accepted and ignored, as OpenAI clients send them freely."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]                     # checked part by part in ``messages_to_record``
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)


def check_supported(req: ChatRequest) -> None:
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name):
            raise bad_request(f"'{name}' is not supported by this server.", name, "unsupported_parameter")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed.", "stop")
    return tuple(s for s in stops if s)  # an empty stop string would cut every response to ""


# --------------------------------------------------------------------------- messages -> Record

@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be, for one server.

    ``file_url_dir``: the folder ``file://`` URLs may read (``None``: refused);
    ``max_request_pixels``: the pixels (width x height, summed over its images) one request may
    send, each image checked from its header before any is decoded."""

    file_url_dir: str | Path | None = None
    max_request_pixels: int = 4096 * 4096   # Qwen3-VL's processor resizes larger images down to this

    def limits(self) -> ImageLimits:
        return ImageLimits(min(self.max_request_pixels, PIL_BOMB_PIXELS), QWEN_MAX_ASPECT_RATIO, 1,
                           names=("prism serve --max-image-pixels", "the model's processor", "the model's processor"))


@dataclass
class _Part:
    ref: ImageRef
    param: str


def _checked_text(text: str, param: str) -> str:
    # the training format marks images with this literal; letting it through would misplace
    # (or miscount) the images
    if IMAGE_PLACEHOLDER in text:
        raise bad_request(f"'{param}' contains the reserved string '{IMAGE_PLACEHOLDER}'; send images "
                          "as image_url content parts.", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can escape half a surrogate pair; the tokenizer cannot take it
        raise bad_request(f"'{param}' holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), "
                          "which is not valid Unicode.", param) from None
    return text


def _image_part(image_url: Any, param: str, policy: ImagePolicy) -> _Part:
    """The image an ``image_url`` part names (a data: or file:// URL), not yet decoded."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"{param}.url" if isinstance(image_url, dict) else param
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{param}' must be a data: or file:// URL string.", param, "invalid_image_url")
    try:
        # base_dirs=None: a client may not name server files by plain path
        ref = image_ref(url, param, file_url_dir=policy.file_url_dir)
    except BadField as e:
        raise bad_request(f"'{param}': {e.why}.", param, "invalid_image_url") from e
    if ref is None:
        raise bad_request(f"'{param}' holds no image.", param, "invalid_image_url")
    return _Part(ref, param)


def _content_text(content: Any, role: str, where: str, parts: list[_Part], policy: ImagePolicy) -> str:
    """One message's content as text with ``<image>`` where its image parts were."""
    if isinstance(content, str):
        return _checked_text(content, f"{where}.content")
    if not isinstance(content, list):
        raise bad_request(f"'{where}.content' must be a string or a list of content parts.", f"{where}.content")
    pieces = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{pwhere}.text' must be a string.", f"{pwhere}.text")
            pieces.append(_checked_text(part["text"], f"{pwhere}.text"))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"'{pwhere}': images are only allowed in user messages.", pwhere)
            parts.append(_image_part(part.get("image_url"), f"{pwhere}.image_url", policy))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise bad_request(f"Invalid content part '{pwhere}': type must be 'text' or 'image_url', "
                              f"got {kind!r}.", f"{pwhere}.type")
    # parts are concatenated as Qwen's own template does with list content
    return "".join(pieces)


def _check_images(parts: list[_Part], policy: ImagePolicy) -> None:
    """Headers first (each image's limits, then the request's pixel total), then decode each,
    so a bad image is the caller's 400 naming its part and a huge one is never decoded."""
    limits, total = policy.limits(), 0
    for p in parts:
        try:
            with open_image(p.ref, limits) as img:
                total += img.size[0] * img.size[1]
        except ImageOutOfLimits as e:
            raise bad_request(f"'{p.param}' is refused: {e}.", p.param, "image_too_large") from e
        except ImageError as e:
            raise bad_request(f"'{p.param}' is not a decodable image: {e}.", p.param, "invalid_image") from e
    if total > policy.max_request_pixels:
        raise bad_request(f"The images of this request hold {total:,} pixels, over this server's limit of "
                          f"{policy.max_request_pixels:,} per request (prism serve --max-image-pixels).",
                          "messages", "image_too_large")
    for p in parts:
        try:
            decode_image(p.ref, limits).close()
        except ImageError as e:
            raise bad_request(f"'{p.param}' is not a decodable image: {e}.", p.param, "invalid_image") from e


def messages_to_record(messages: list[Any], policy: ImagePolicy | None = None) -> Record:
    """OpenAI chat messages -> a prompt ``Record`` (earlier assistant turns included), its
    images checked (:func:`_check_images`)."""
    policy = policy or ImagePolicy()
    if not messages:
        raise bad_request("'messages' must contain at least one message.", "messages")
    turns: list[dict[str, str]] = []
    parts: list[_Part] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"'{where}' must be an object with 'role' and 'content'.", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected 'system', 'user' "
                              "or 'assistant'.", f"{where}.role")
        if "content" not in msg:
            raise bad_request(f"'{where}.content' is missing.", f"{where}.content")
        role = ROLE_ALIASES[role]
        turns.append({"role": role, "content": _content_text(msg["content"], role, where, parts, policy)})
    _check_images(parts, policy)
    return Record(id=f"req-{uuid.uuid4().hex[:12]}", messages=turns, images=[p.ref for p in parts],
                  source="request", index=0)
