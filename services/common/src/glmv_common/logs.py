"""Structured logging: every record carries the component and the ids of the request it serves."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "glmv_log_context",
    default={},  # noqa: B039 - never mutated, only replaced
)
_component = "glmv"


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Attach ids (request_id, session_id, turn_id, ...) to every record logged inside the block."""
    merged = {**_context.get(), **{k: str(v) for k, v in ids.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.component = _component
        record.ctx = _context.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "component": getattr(record, "component", _component),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "ctx", {}))
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in getattr(record, "ctx", {}).items())
        extra = getattr(record, "fields", None)
        fields = " ".join(f"{k}={v}" for k, v in extra.items()) if isinstance(extra, dict) else ""
        component = getattr(record, "component", _component)
        base = f"{record.levelname:<7} {component} {record.name}: {record.getMessage()}"
        text = " ".join(part for part in (base, ctx, fields) if part)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(component: str, level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once per process."""
    global _component
    _component = component
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def kv(**fields: object) -> dict[str, object]:
    """``log.info("loaded", extra=kv(path=..., device=...))`` adds structured fields to a record."""
    return {"fields": fields}
