"""``OPTIONS`` on any API path answers 204 with the methods that path serves, and a 405 names them
all in ``Allow`` (the router alone names only the first route matching the path)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _http_routes(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(path template, methods) of every HTTP route, through included routers."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            inner = prefix + getattr(getattr(route, "include_context", None), "prefix", "")
            yield from _http_routes(included.routes, inner)
        elif getattr(route, "methods", None) and isinstance(getattr(route, "path", None), str):
            yield prefix + route.path, set(route.methods)


def route_table(app: Any) -> list[tuple[re.Pattern[str], set[str]]]:
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = [(compile_path(path)[0], methods) for path, methods in _http_routes(app.router.routes)]
        app.state.allow_table = table
    return table


def allowed_methods(scope: Scope) -> set[str]:
    methods: set[str] = set()
    for regex, route_methods in route_table(scope["app"]):
        if regex.match(scope["path"]):
            methods |= route_methods
    return methods


class OptionsResponder:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            methods = allowed_methods(scope)
            if methods:
                allow = ", ".join(sorted(methods | {"OPTIONS"}))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 204,
                        "headers": [(b"allow", allow.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return

        async def fix_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allow = ", ".join(sorted(allowed_methods(scope) | {"OPTIONS"}))
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow.encode())]}
            await send(message)

        await self.app(scope, receive, fix_allow)
