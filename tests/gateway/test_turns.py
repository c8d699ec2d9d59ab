"""Spoken and typed turns through the real stack: events, audio, history, locks, limits."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf

from glmv_gateway.client import GatewayClient, GatewayError

from .conftest import FAST


def mel_frames(tokens: int) -> int:
    """The decoder's mel-length law (float32, as the reference computes it)."""
    return int(
        np.float32(np.float32(np.float32(tokens) / np.float32(12.5)) * np.float32(22050)) / np.float32(256)
    )


def test_spoken_turn_end_to_end(client: GatewayClient, sample_wav: bytes) -> None:
    session = client.create_session(**FAST)
    result = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
    kinds = [e["type"] for e in result.events]
    assert kinds[0] == "turn.started" and kinds[-1] == "turn.done", kinds
    samples, rate = sf.read(io.BytesIO(sample_wav))
    assert rate == 16000
    assert result.events[0]["input"] == {"kind": "audio", "tokens": -(-len(samples) // 1280)}
    assert "error" not in kinds
    done = result.done
    assert done["partial"] is False
    assert done["end_reason"] in {"end_token", "eos", "max_tokens", "audio_cap"}
    usage = done["usage"]
    assert usage["completion_tokens"] == usage["text_tokens"] + usage["audio_tokens"]
    assert usage["audio_tokens"] > 0, "the seeded dev model is expected to speak"
    # text deltas concatenate to the final text
    assert result.text_deltas == done["text"]
    # the reply audio: 22.05 kHz, exactly the one-shot length of the generated audio tokens
    assert result.sample_rate == 22050
    assert result.audio.size == 256 * mel_frames(usage["audio_tokens"])
    seqs = [e["seq"] for e in result.events if e["type"] == "audio.delta"]
    assert seqs == list(range(len(seqs)))
    offsets = [e["sample_offset"] for e in result.events if e["type"] == "audio.delta"]
    sizes = [e["samples"].size for e in result.events if e["type"] == "audio.delta"]
    assert offsets == list(np.cumsum([0, *sizes[:-1]]))
    t = done["timings"]
    assert 0 < t["tokenize_ms"] <= t["time_to_first_audio_ms"] <= t["total_ms"]
    if t["time_to_first_text_ms"] is not None:
        assert t["time_to_first_text_ms"] <= t["total_ms"]
    assert t["audio_ms"] == pytest.approx(1000 * result.audio.size / 22050, abs=0.2)
    assert t["rtf"] == pytest.approx(t["total_ms"] / t["audio_ms"], rel=1e-3)
    # history holds the tokens and text, not audio
    history = client.history(session["id"])["turns"]
    assert len(history) == 1
    assert history[0]["user"]["audio_tokens"] == result.events[0]["input"]["tokens"]
    assert history[0]["assistant"]["text"] == done["text"]
    assert history[0]["assistant"]["token_count"] == usage["completion_tokens"]


@pytest.mark.parametrize(("rate", "encoding"), [(16000, "mulaw"), (48000, "float32"), (8000, "alaw")])
def test_requested_output_format(client: GatewayClient, sample_wav: bytes, rate: int, encoding: str) -> None:
    session = client.create_session(**FAST, output={"sample_rate": rate, "encoding": encoding})
    result = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
    deltas = [e for e in result.events if e["type"] == "audio.delta"]
    assert deltas and all(e["sample_rate"] == rate and e["encoding"] == encoding for e in deltas)
    native = 256 * mel_frames(result.done["usage"]["audio_tokens"])
    assert abs(result.audio.size - native * rate / 22050) <= 2


def test_text_turns_and_history_feed_the_next_prompt(client: GatewayClient) -> None:
    session = client.create_session(**FAST, mode="text")
    first = client.turn(session["id"], text="Tell me a story.")
    assert first.done["partial"] is False
    second = client.turn(session["id"], text="And then?")
    u1, u2 = first.done["usage"], second.done["usage"]
    # the second prompt contains the first turn: its prompt and every token the model generated
    new_user = u2["prompt_tokens"] - u1["prompt_tokens"] - u1["completion_tokens"]
    assert 0 < new_user < 20
    assert u2["lm_cached_prompt_tokens"] == 0  # this stack runs its LM without the prefix cache
    turns = client.history(session["id"])["turns"]
    assert [t["user"]["text"] for t in turns] == ["Tell me a story.", "And then?"]
    assert client.get_session(session["id"])["turns"] == 2


def test_non_streaming_turn_returns_wav(client: GatewayClient, sample_wav: bytes) -> None:
    session = client.create_session(**FAST)
    response = client.http.post(
        f"/v1/sessions/{session['id']}/turns?stream=false",
        content=sample_wav,
        headers={"Content-Type": "audio/wav"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio_wav_base64"])))
    assert rate == 22050 and len(samples) == body["audio_samples"]
    assert len(samples) == 256 * mel_frames(body["usage"]["audio_tokens"])
    assert body["text"] == client.history(session["id"])["turns"][0]["assistant"]["text"]


def test_raw_pcm_and_multipart_inputs(client: GatewayClient, sample_wav: bytes) -> None:
    samples, rate = sf.read(io.BytesIO(sample_wav), dtype="int16")
    session = client.create_session(**FAST)
    raw = client.turn(
        session["id"], audio=samples.tobytes(), content_type=f"audio/pcm;rate={rate};encoding=pcm16"
    )
    response = client.http.post(
        f"/v1/sessions/{session['id']}/turns?stream=false",
        files={"audio": ("q.wav", sample_wav, "audio/wav")},
    )
    assert response.status_code == 200, response.text
    history = client.history(session["id"])["turns"]
    # the same speech gives the same speech tokens whichever way it was sent
    assert (
        history[0]["user"]["audio_tokens"]
        == history[1]["user"]["audio_tokens"]
        == raw.events[0]["input"]["tokens"]
    )


def test_second_concurrent_turn_gets_409_and_first_is_kept_partial(
    client: GatewayClient, stack, sample_wav: bytes
) -> None:
    session = client.create_session(max_new_tokens=2000, seed=7, temperature=1.0, top_p=1.0)
    events = []
    with client.http.stream(
        "POST",
        f"/v1/sessions/{session['id']}/turns",
        content=sample_wav,
        headers={"Content-Type": "audio/wav"},
    ) as response:
        lines = response.iter_lines()
        events.append(json.loads(next(lines)))
        assert events[0]["type"] == "turn.started"
        with pytest.raises(GatewayError) as err:
            client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
        assert err.value.status == 409 and "already has a turn" in err.value.message
        for line in lines:  # read a little of the reply, then hang up
            events.append(json.loads(line))
            if len(events) > 5:
                break
    # the gateway notices the client left, cancels the streams, stores the partial reply, frees the lock
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        turns = client.history(session["id"])["turns"]
        if turns:
            break
        time.sleep(0.1)
    assert turns and turns[0]["assistant"]["partial"] is True
    assert turns[0]["assistant"]["end_reason"] == "cancelled"
    lock = redis.Redis.from_url(stack.redis_url)
    while lock.exists(f"glmv:session:{session['id']}:lock") and time.monotonic() < deadline:
        time.sleep(0.05)  # the lock is released right after the partial turn is stored
    assert not lock.exists(f"glmv:session:{session['id']}:lock")
    client.patch_session(session["id"], max_new_tokens=FAST["max_new_tokens"])
    assert client.turn(session["id"], audio=sample_wav, content_type="audio/wav").done["partial"] is False


def test_lock_of_a_crashed_gateway_expires(client: GatewayClient, stack, sample_wav: bytes) -> None:
    session = client.create_session(**FAST)
    r = redis.Redis.from_url(stack.redis_url)
    r.set(f"glmv:session:{session['id']}:lock", "turn-of-a-dead-gateway", ex=2)
    with pytest.raises(GatewayError) as err:
        client.turn(session["id"], text="hello")
    assert err.value.status == 409
    deadline = time.monotonic() + 10
    while r.exists(f"glmv:session:{session['id']}:lock") and time.monotonic() < deadline:
        time.sleep(0.05)  # Redis expires the dead gateway's lock after 2 s
    assert client.turn(session["id"], text="hello").done["partial"] is False


def test_session_ttl_is_set_and_refreshed(client: GatewayClient, stack) -> None:
    session = client.create_session(**FAST)
    r = redis.Redis.from_url(stack.redis_url)
    key = f"glmv:session:{session['id']}"
    r.expire(key, 100)
    client.get_session(session["id"])
    assert r.ttl(key) > 100  # refreshed to the configured TTL on use
    client.turn(session["id"], text="hi")
    assert r.ttl(f"{key}:turns") > 100
    client.delete_session(session["id"])
    assert not r.exists(key) and not r.exists(f"{key}:turns")
    with pytest.raises(GatewayError) as err:
        client.get_session(session["id"])
    assert err.value.status == 404


def test_session_crud_and_validation(client: GatewayClient) -> None:
    session = client.create_session(temperature=0.5, style={"emotion": "happy"})
    assert session["settings"]["temperature"] == 0.5
    patched = client.patch_session(session["id"], output={"sample_rate": 16000, "encoding": "pcm16"})
    assert patched["settings"]["output"]["sample_rate"] == 16000
    assert patched["settings"]["style"]["emotion"] == "happy"
    for bad in (
        {"temperature": -1},
        {"output": {"sample_rate": 12345}},
        {"unknown_field": 1},
        {"chunk_schedule": [0]},
    ):
        with pytest.raises(GatewayError) as err:
            client.create_session(**bad)
        assert err.value.status == 422, bad


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"", "audio/wav", 400, "empty"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt garbage", "audio/wav", 400, "bad audio"),
        (b"\x00\x01\x02", "audio/pcm;rate=16000;encoding=pcm16", 400, "truncated"),
        (b"\x00\x00" * 100, "audio/pcm;rate=4000;encoding=pcm16", 400, "out of range"),
        (b"\x00\x00" * 100, "audio/pcm;encoding=pcm16", 400, "rate"),
        (b"\x00" * 100, "video/mp4", 415, "unsupported content type"),
        (b"{not json", "application/json", 400, "bad JSON"),
        (b'{"text": ""}', "application/json", 400, "bad JSON"),
        (b'{"txt": "hi"}', "application/json", 400, "bad JSON"),
        (np.full(1000, np.nan, "<f4").tobytes(), "audio/pcm;rate=16000;encoding=float32", 400, "NaN"),
        (b"\x00\x00" * (1024 * 1024 + 10), "audio/pcm;rate=16000;encoding=pcm16", 413, "limit"),
        (b"\x00\x00" * (21 * 16000), "audio/pcm;rate=16000;encoding=pcm16", 413, "limit is 20"),
    ],
)
def test_bad_turn_input(
    client: GatewayClient, body: bytes, content_type: str, status: int, message: str
) -> None:
    session = client.create_session(**FAST)
    response = client.http.post(
        f"/v1/sessions/{session['id']}/turns", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert client.history(session["id"])["turns"] == []
    # nothing is locked: a good turn goes through right after
    assert client.turn(session["id"], text="hello").done["partial"] is False


def test_unknown_session_and_auth(stack, client: GatewayClient) -> None:
    response = client.http.post("/v1/sessions/nope/turns", json={"text": "hi"})
    assert response.status_code == 404 and "not found" in response.json()["error"]["message"]
    assert client.http.get("/v1/sessions/nope/history").status_code == 404
    anonymous = httpx.post(f"{stack.gateway_url}/v1/sessions")
    assert anonymous.status_code == 401 and "missing API key" in anonymous.json()["error"]["message"]
    wrong = httpx.post(f"{stack.gateway_url}/v1/sessions", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{stack.gateway_url}/healthz").status_code == 200
    assert httpx.get(f"{stack.gateway_url}/readyz").status_code == 200


def test_api_key_stored_in_redis_and_per_key_turn_limit(stack, sample_wav: bytes) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    import hashlib

    r.sadd("glmv:apikeys", hashlib.sha256(b"redis-key").hexdigest())
    with GatewayClient(stack.gateway_url, "redis-key") as c:
        session = c.create_session(**FAST)
        assert c.turn(session["id"], text="hi").done["partial"] is False
        # fill this key's turn slots (8 by default) as crashed turns would
        now = time.time()
        r.zadd(
            f"glmv:apikey-turns:{hashlib.sha256(b'redis-key').hexdigest()}", {f"t{i}": now for i in range(8)}
        )
        with pytest.raises(GatewayError) as err:
            c.turn(session["id"], text="hi")
        assert err.value.status == 429


def test_readyz_reports_compatible_models(stack) -> None:
    auth = {"Authorization": f"Bearer {stack.api_key}"}  # model details need a key
    body = httpx.get(f"{stack.gateway_url}/readyz", headers=auth).json()
    assert body["status"] == "ready" and body["compatibility"] == "ok"
    assert set(body["services"].values()) == {"SERVING"}
    sizes = {m["codebook_size"] for m in body["models"].values()}
    assert len(sizes) == 1


def test_metrics_exposes_turn_histograms(stack, client: GatewayClient) -> None:
    session = client.create_session(**FAST)
    client.turn(session["id"], text="hi")
    text = httpx.get(f"{stack.gateway_url}/metrics").text
    assert "glmv_gateway_turn_duration_seconds_count" in text
    count = [ln for ln in text.splitlines() if ln.startswith("glmv_gateway_turn_duration_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_parallel_sessions_do_not_interfere(stack, sample_wav: bytes) -> None:
    results: dict[int, object] = {}

    def run(i: int) -> None:
        with GatewayClient(stack.gateway_url, stack.api_key) as c:
            s = c.create_session(**{**FAST, "temperature": 0})
            results[i] = (c.turn(s["id"], audio=sample_wav, content_type="audio/wav"), c.history(s["id"]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    texts = {r[0].done["text"] for r in results.values()}
    # same seed, same input, separate sessions: identical replies, one history turn each
    assert len(results) == 3 and len(texts) == 1
    assert all(len(r[1]["turns"]) == 1 for r in results.values())


@pytest.mark.parametrize("component", ["tokenizer", "lm", "decoder"])
def test_services_log_what_they_serve(stack, component: str) -> None:
    log = (stack.log_dir / f"{component}.log").read_text()
    line = next(ln for ln in log.splitlines() if f"serving {component} from" in ln)
    assert (
        str(stack.models[component]) in line
        and "cpu" in line
        and "float32" in line
        and "version 0.1.0" in line
    )


def test_every_component_exposes_metrics(stack, client: GatewayClient, sample_wav: bytes) -> None:
    session = client.create_session(**FAST)
    client.turn(session["id"], audio=sample_wav, content_type="audio/wav")

    def value(component: str, name: str) -> float:
        text = httpx.get(stack.metrics_url(component)).text
        lines = [ln for ln in text.splitlines() if ln.startswith(name) and not ln.startswith("#")]
        assert lines, f"{component} has no {name}"
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert value("tokenizer", "glmv_tokenizer_forward_seconds_count") >= 1
    assert value("tokenizer", "glmv_tokenizer_audio_seconds_total") > 3
    assert value("lm", "glmv_lm_generated_tokens_total") >= 1
    assert value("decoder", "glmv_decoder_chunk_seconds_count") >= 1
    assert value("gateway", "glmv_gateway_time_to_first_audio_seconds_count") >= 1
    assert value("gateway", "glmv_gateway_rtf_count") >= 1
    for component in ("tokenizer", "lm", "decoder"):
        assert value(component, "glmv_grpc_requests_total") >= 1
        assert value(component, "glmv_model_ready") == 1


def test_grafana_dashboard_uses_only_exported_metrics(stack, client: GatewayClient) -> None:
    import re
    from pathlib import Path

    session = client.create_session(**FAST)
    client.turn(session["id"], text="hello")
    exported = "\n".join(
        httpx.get(stack.metrics_url(c)).text for c in ("tokenizer", "lm", "decoder", "gateway")
    )
    dashboard = (Path(__file__).resolve().parents[2] / "deploy/grafana/glmvoice-dashboard.json").read_text()
    names = {re.sub(r"_bucket$", "", n) for n in re.findall(r"glmv_[a-z_]+", dashboard)}
    missing = [n for n in sorted(names) if f"# TYPE {n} " not in exported and f"\n{n}" not in exported]
    assert names and not missing, missing


def test_sessions_are_private_to_their_api_key(stack, client: GatewayClient) -> None:
    import hashlib

    redis.Redis.from_url(stack.redis_url).sadd("glmv:apikeys", hashlib.sha256(b"tenant-b").hexdigest())
    session = client.create_session(**FAST)
    with GatewayClient(stack.gateway_url, "tenant-b") as other:
        for call in (
            lambda: other.get_session(session["id"]),
            lambda: other.history(session["id"]),
            lambda: other.turn(session["id"], text="hi"),
            lambda: other.delete_session(session["id"]),
        ):
            with pytest.raises(GatewayError) as err:
                call()
            assert err.value.status == 404
    assert client.get_session(session["id"])["id"] == session["id"]


def test_chat_cli_speaks_and_continues_a_session(stack, tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    glmv = str(Path(sys.executable).parent / "glmv")
    base = [glmv, "chat", "--url", stack.gateway_url, "--api-key", stack.api_key]
    out = tmp_path / "reply.wav"
    sample = Path(__file__).resolve().parents[2] / "samples" / "question.wav"
    first = subprocess.run(
        [*base, "--audio", str(sample), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    session_id = next(ln.split()[-1] for ln in first.stdout.splitlines() if ln.startswith("session:"))
    assert "latency: first text" in first.stdout and "reply audio:" in first.stdout
    samples, rate = sf.read(out)
    assert rate == 22050 and len(samples) > 0
    second = subprocess.run(
        [*base, "--text", "and then?", "--session", session_id], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    with GatewayClient(stack.gateway_url, stack.api_key) as c:
        assert len(c.history(session_id)["turns"]) == 2
    bad = subprocess.run(
        [*base, "--text", "hi", "--session", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "404" in bad.stderr
