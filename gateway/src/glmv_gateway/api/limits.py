"""Bounds on what a request may make the gateway parse: JSON nesting depth and the size of the
settings bodies (``POST /v1/sessions``, ``PATCH /v1/sessions/{id}``), refused before parsing."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmv_gateway import metrics
from glmv_gateway.api.errors import ApiError, error_body

MAX_JSON_DEPTH = 32


def json_depth_ok(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array/object nests deeper than ``limit`` (checked before parsing: the parser
    recurses, and a few thousand brackets exhaust the stack)."""
    data = text.encode() if isinstance(text, str) else text
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def load_json(text: str | bytes, what: str) -> Any:
    """Parse a JSON document nested at most :data:`MAX_JSON_DEPTH` deep, or raise ApiError 400."""
    if not json_depth_ok(text):
        raise ApiError(400, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, f"{what} is not valid JSON") from None


SETTINGS_PATH = re.compile(r"/v1/sessions(/[^/]*)?/?")


class SettingsBodyLimit:
    """ASGI middleware: a settings body larger than ``limit`` bytes is answered 413 as soon as it
    says so (Content-Length) or overflows, and one nested too deeply 400, before any parsing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PATCH")
            or not SETTINGS_PATH.fullmatch(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, 413, f"request body is {int(declared)} bytes; the limit is {self.limit}")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, 413, f"request body exceeds the limit of {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not json_depth_ok(body):
            await self._refuse(send, 400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        metrics.HTTP_ERRORS.labels(str(status)).inc()
        payload = json.dumps(error_body(status, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
