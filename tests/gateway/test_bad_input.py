"""Bad input through the real stack: each gets a clear 4xx naming the problem, never a bare 500,
and nothing stored or locked changes."""

from __future__ import annotations

import io
import re

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf

from glmv_gateway.client import GatewayClient

from .conftest import FAST

DEEP = "[" * 2000 + "]" * 2000


def redis_errors(stack) -> float:
    text = httpx.get(f"{stack.gateway_url}/metrics").text
    return sum(
        float(m.group(1))
        for m in re.finditer(r'^glmv_gateway_errors_total\{[^}]*component="redis"[^}]*\} (\S+)', text, re.M)
    )


def test_deeply_nested_json_job_is_a_400(client: GatewayClient) -> None:
    response = client.http.post(
        "/v1/jobs", content=DEEP, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "nests deeper" in response.json()["error"]["message"]
    response = client.http.post("/v1/jobs", files={"text": (None, "hi"), "options": (None, DEEP)})
    assert response.status_code == 400, response.text
    assert "options" in response.json()["error"]["message"]
    # the connection still works
    assert client.http.get("/healthz").status_code == 200


def test_deeply_nested_or_huge_settings_bodies_are_refused(client: GatewayClient) -> None:
    session = client.create_session(**FAST)
    for method, path in (("POST", "/v1/sessions"), ("PATCH", f"/v1/sessions/{session['id']}")):
        response = client.http.request(
            method, path, content=DEEP, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (method, response.text)
        big = b'{"style": {"free_text": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
        json_type = {"Content-Type": "application/json"}
        response = client.http.request(method, path, content=big, headers=json_type)
        assert response.status_code == 413, (method, response.text)
        assert "limit" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: the cap still holds while reading
            yield b'{"style": {"free_text": "'
            for _ in range(64):
                yield b"x" * 65536
            yield b'"}}'

        response = client.http.request(
            method, path, content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413, (method, response.text)
    assert client.get_session(session["id"])["settings"] == session["settings"]


@pytest.mark.parametrize("suffix", [":turns", ":lock", "%3Aturns", "*", "..", "A" * 32])
def test_malformed_session_ids_are_404_and_touch_no_key(stack, client: GatewayClient, suffix: str) -> None:
    session = client.create_session(**FAST)
    client.turn(session["id"], text="hello")
    r = redis.Redis.from_url(stack.redis_url)
    before = {k: r.type(k) for k in r.keys(f"glmv:session:{session['id']}*")}
    errors = redis_errors(stack)
    bad = session["id"] + suffix if suffix != "A" * 32 else suffix
    for method, path in (
        ("GET", f"/v1/sessions/{bad}"),
        ("GET", f"/v1/sessions/{bad}/history"),
        ("PATCH", f"/v1/sessions/{bad}"),
        ("DELETE", f"/v1/sessions/{bad}"),
        ("POST", f"/v1/sessions/{bad}/turns"),
    ):
        kwargs = {"json": {"text": "hi"} if method == "POST" else {}}
        response = client.http.request(method, path, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    assert redis_errors(stack) == errors
    assert {k: r.type(k) for k in r.keys(f"glmv:session:{session['id']}*")} == before
    assert len(client.history(session["id"])["turns"]) == 1


def test_malformed_job_ids_are_404(client: GatewayClient) -> None:
    response = client.http.post("/v1/jobs", json={"text": "hi"})
    job_id = response.json()["id"]
    for bad in (f"{job_id}:run", "..", "x" * 40):
        assert client.http.get(f"/v1/jobs/{bad}").status_code == 404, bad


def test_strict_types_and_enums(client: GatewayClient) -> None:
    for bad in (
        {"seed": True},
        {"top_k": 1.5},
        {"temperature": "0.5"},
        {"output": {"sample_rate": 11025}},
        {"chunk_schedule": [1001]},
        {"chunk_schedule": [True]},
    ):
        response = client.http.post("/v1/sessions", json=bad)
        assert response.status_code == 422, (bad, response.text)
    assert client.http.post("/v1/sessions", json={"temperature": 1, "seed": 3}).status_code == 201


def wav_bytes(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), "f4"), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (wav_bytes()[:8000], "audio/wav", 400, "truncated"),
        (wav_bytes(), "audio/flac", 415, "holds a WAV file"),
        (wav_bytes(), "audio/ogg", 415, "holds a WAV file"),
        (b"\x00", "audio/basic", 400, "shorter than one speech token"),
        (b"\x00\x00" * 100, "audio/pcm;rate=16000;encoding=pcm16", 400, "shorter than one speech token"),
        (wav_bytes(0.02), "audio/wav", 400, "shorter than one speech token"),
        (b"fLaC" + b"\x00" * 64, "audio/flac", 400, "bad audio"),
    ],
)
def test_truncated_or_mislabelled_audio(
    client: GatewayClient, body: bytes, content_type: str, status: int, message: str
) -> None:
    session = client.create_session(**FAST)
    response = client.http.post(
        f"/v1/sessions/{session['id']}/turns", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    text = response.json()["error"]["message"]
    assert message in text and "BytesIO" not in text and "0x" not in text, text
    assert client.history(session["id"])["turns"] == []


def test_readyz_details_need_a_key(stack) -> None:
    anonymous = httpx.get(f"{stack.gateway_url}/readyz").json()
    assert anonymous["status"] == "ready" and "models" not in anonymous
    assert "checkpoint" not in str(anonymous)
    keyed = httpx.get(
        f"{stack.gateway_url}/readyz", headers={"Authorization": f"Bearer {stack.api_key}"}
    ).json()
    assert all(len(m["checkpoint"]) == 16 for m in keyed["models"].values())
    wrong = httpx.get(f"{stack.gateway_url}/readyz", headers={"Authorization": "Bearer nope"}).json()
    assert "models" not in wrong


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/sessions", {"POST", "OPTIONS"}),
        ("/v1/sessions/0123456789abcdef0123456789abcdef", {"GET", "PATCH", "DELETE", "OPTIONS"}),
        ("/v1/sessions/0123456789abcdef0123456789abcdef/turns", {"POST", "OPTIONS"}),
        ("/v1/jobs", {"POST", "OPTIONS"}),
    ],
)
def test_options_and_405_name_every_method(stack, path: str, methods: set[str]) -> None:
    response = httpx.options(f"{stack.gateway_url}{path}")
    assert response.status_code == 204
    assert set(response.headers["allow"].replace(" ", "").split(",")) == methods
    response = httpx.put(f"{stack.gateway_url}{path}")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == methods


def test_patch_with_nulls_resets_to_defaults(client: GatewayClient) -> None:
    session = client.create_session(temperature=0.7, output={"sample_rate": 16000}, seed=3)
    response = client.http.patch(
        f"/v1/sessions/{session['id']}",
        json={"temperature": None, "output": None, "repetition_penalty": None, "seed": None},
    )
    assert response.status_code == 200, response.text  # was a bare 500
    settings = response.json()["settings"]
    assert settings["temperature"] == 0.2 and settings["output"]["sample_rate"] == 22050
    assert settings["seed"] is None
