"""What keeps ``prism serve`` from being held up: the API key and body-size checks (plain
ASGI middleware, so they act before a body is read), the admission limit on requests in
flight (429 when full) and the watch that drops a request whose client has gone.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one runs the endpoint behind
a task group whose ``receive`` never reports a disconnect to ``Request.is_disconnected``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .serve_requests import APIError

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but ``/health``, compared in constant
    time; checked before the body is read. The key itself is never logged."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            error = self._error(dict(scope.get("headers") or []).get(b"authorization", b""))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _error(self, header: bytes) -> APIError | None:
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.expected):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is over this server's limit of {limit:,} bytes "
                         "(prism serve --max-body-bytes).", code="request_too_large")


class BodyLimitMiddleware:
    """Refuse a request body over ``max_bytes`` with a 413: at once when ``Content-Length``
    says so (nothing read), else as soon as the bytes received pass it (the app is told the
    client left, and its answer is replaced by the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        state = {"received": 0, "over": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not state["over"]:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"]:
            await too_large(self.max_bytes).response()(scope, receive, send)


class Admission:
    """At most ``limit`` requests in flight (being encoded, waiting or generating); one more
    is answered 429 at once, so a flood queues no work and holds no memory. Used only on the
    event loop's thread."""

    def __init__(self, limit: int):
        self.limit, self.in_flight, self.refused = limit, 0, 0

    def __enter__(self) -> Admission:
        if self.in_flight >= self.limit:
            self.refused += 1
            raise APIError(429, f"The server is busy: {self.in_flight} requests are in flight, its limit "
                                f"(prism serve --max-queue). Retry shortly.", type="server_error",
                           code="server_busy", headers={"Retry-After": "1"})
        self.in_flight += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.in_flight -= 1


class ClientGone(APIError):
    """The client closed the connection: its work is dropped (the answer reaches no one)."""

    def __init__(self) -> None:
        super().__init__(499, "The client closed the request.", code="client_closed")


async def unless_gone(request: Request, work: Awaitable, gone: threading.Event,
                      on_gone: Callable[[], None] = lambda: None):
    """``await work``, polling every ``DISCONNECT_POLL_S`` whether the client is still there.
    When it has gone: set ``gone`` (a thread doing the work checks it), call ``on_gone`` (to
    take the request out of the queue) and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            gone.set()
            on_gone()
            # the work may still finish or fail in its thread; its outcome is not wanted
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise ClientGone()
