"""A small Python client of the gateway's HTTP API (used by ``glmv chat`` and the tests)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from glmv_common import audio as audio_io
from glmv_gateway.conversation.audio_out import ReplyAudio
from glmv_gateway.conversation.events import AudioDelta, parse_event


class GatewayError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


@dataclass
class TurnResult:
    """Everything a turn streamed, put together."""

    events: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    sample_rate: int = 0
    done: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @property
    def text_deltas(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "text.delta")

    def write_wav(self, path: str | Path) -> None:
        Path(path).write_bytes(audio_io.encode_wav(self.audio, self.sample_rate or 22050))


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        try:
            body = response.json()
            message = body.get("error", {}).get("message", response.text)
        except (json.JSONDecodeError, AttributeError):
            body, message = response.text, response.text
        raise GatewayError(response.status_code, message, body)


class GatewayClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self.http.request(method, url, **kwargs)
        _raise_for(response)
        return response.json() if response.content else None

    def create_session(self, **settings: Any) -> dict[str, Any]:
        return self._json("POST", "/v1/sessions", json=settings or None)

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sessions/{session_id}")

    def patch_session(self, session_id: str, **changes: Any) -> dict[str, Any]:
        return self._json("PATCH", f"/v1/sessions/{session_id}", json=changes)

    def delete_session(self, session_id: str) -> None:
        self._json("DELETE", f"/v1/sessions/{session_id}")

    def history(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sessions/{session_id}/history")

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = self.http.get("/readyz")
        return response.status_code, response.json()

    def stream_turn(
        self,
        session_id: str,
        *,
        audio: bytes | None = None,
        content_type: str = "audio/wav",
        text: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the turn's events as they arrive (audio deltas carry decoded ``samples``)."""
        if text is not None:
            request = {"json": {"text": text}}
        else:
            request = {"content": audio, "headers": {"Content-Type": content_type}}
        with self.http.stream("POST", f"/v1/sessions/{session_id}/turns", **request) as response:
            _raise_for(response)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "audio.delta":
                    raw = base64.b64decode(event["audio"])
                    event["samples"] = audio_io.decode_pcm(raw, event["encoding"])[:, 0]
                yield event

    def turn(
        self, session_id: str, *, on_event: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any
    ) -> TurnResult:
        """Run one turn and gather its events; ``on_event`` sees each one as it arrives."""
        result = TurnResult()
        audio = ReplyAudio()
        for event in self.stream_turn(session_id, **kwargs):
            if on_event is not None:
                on_event(event)
            result.events.append(event)
            if event["type"] == "audio.delta":
                wire = {k: v for k, v in event.items() if k != "samples"}
                delta = parse_event(wire)
                assert isinstance(delta, AudioDelta)
                audio.add(delta)
                result.sample_rate = delta.sample_rate
            elif event["type"] == "turn.done":
                result.done = event
                result.text = event["text"]
            elif event["type"] == "error":
                result.error = event
        if audio:
            result.audio = audio.pcm()
        return result
