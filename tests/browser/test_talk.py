"""Talking to the assistant through the page, end to end: Chromium's fake microphone plays a WAV
into the page, which streams it to the realtime endpoint of the local stack (dev checkpoints), and
plays the reply. Nothing is clicked but Start (and Stop reply where that is the point)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from glmv_gateway.stack import LocalStack, make_dev_models

from ..gateway.conftest import stack_db, start_stack
from .conftest import ROOT, launch, speech_wav

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Short replies for a turn; long ones (seed 7 at temperature 1 runs to the token limit) to be cut.
SHORT = "seed=1234&max_output_tokens=48&top_p=1&temperature=0.8"
LONG = "seed=7&max_output_tokens=1200&top_p=1&temperature=1"
SCREENSHOT = os.environ.get("GLMV_DEMO_SCREENSHOT")  # e.g. docs/talk-page.png: keep the picture


@pytest.fixture(scope="module")
def talk_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    models = make_dev_models(tmp_path_factory.getbasetemp() / "models")
    stack = start_stack(models, tmp_path_factory.mktemp("talk-stack"), db=stack_db("own"), prefix_cache=False)
    try:
        probe = httpx.post(
            f"{stack.gateway_url}/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {stack.api_key}"},
            json={},
            timeout=10,
        )
        if probe.status_code == 404:
            pytest.skip("talk tests SKIPPED: this gateway has no realtime endpoint (/v1/realtime) yet")
        yield stack
    finally:
        stack.stop()


def page_url(stack: LocalStack, query: str) -> str:
    return f"http://localhost:{stack.ports['gateway']}/demo/?{query}"


def stats(page) -> dict:
    return page.evaluate("({...window.glmvDemo.stats})")


def test_a_spoken_turn_is_answered_with_audio(playwright, talk_stack: LocalStack, tmp_path: Path) -> None:
    wav = speech_wav(tmp_path / "mic.wav", [("speech", 0), ("silence", 20.0)])
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, SHORT))
        page.click("#start")
        page.wait_for_function("window.glmvDemo.state.phase === 'live'", timeout=30_000)
        # the end of the question is found by the server's VAD: nothing is clicked
        page.wait_for_function("window.glmvDemo.stats.speechStopped >= 1", timeout=60_000)
        page.wait_for_function("window.glmvDemo.turns.length >= 1", timeout=120_000)
        turn = page.evaluate("window.glmvDemo.turns[0]")
        assert turn["status"] == "completed", turn
        assert turn["audioTokens"] > 0 and turn["textTokens"] is not None, turn
        assert turn["audioSamples"] > 0
        assert 0 < turn["firstAudioMs"] <= turn["totalMs"], turn
        # every received sample is played, through the page's own playback counters
        page.wait_for_function("window.glmvDemo.stats.itemsPlayed >= 1", timeout=60_000)
        s = stats(page)
        assert s["samplesPlayed"] == s["samplesReceived"] == turn["audioSamples"], s
        assert s["chunksSent"] > 0 and s["errors"] == 0, s
        # the transcript and the latency figures are on the page
        assert page.inner_text(".transcript li.user .text").startswith("🎤")
        assert page.inner_text(".transcript li.assistant .text") == turn["text"]
        assert "first audio" in page.inner_text(".transcript li.assistant .meta")
        assert page.inner_text('[data-metric="first-audio"]').endswith(" ms")
        assert page.inner_text('[data-metric="audio-tokens"]') == str(turn["audioTokens"])
        assert page.inner_text('[data-metric="status"]') == "completed"
        assert page.console_errors == []
        shot = tmp_path / "talk-page.png"
        page.set_viewport_size({"width": 1000, "height": 640})
        page.screenshot(path=str(shot))
        if SCREENSHOT:
            shutil.copy(shot, ROOT / SCREENSHOT)
    finally:
        browser.close()


def test_speaking_over_the_reply_cuts_it_where_it_was_heard(
    playwright, talk_stack: LocalStack, tmp_path: Path
) -> None:
    # the question, a pause (the reply starts), the question again over the reply
    pattern = [("speech", 0), ("silence", 2.5), ("speech", 0), ("silence", 30.0)]
    wav = speech_wav(tmp_path / "mic.wav", pattern)
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, LONG))
        page.click("#start")
        page.wait_for_function("window.glmvDemo.stats.bargeIns >= 1", timeout=120_000)
        page.wait_for_function("window.glmvDemo.stats.truncated >= 1", timeout=30_000)
        page.wait_for_function("window.glmvDemo.turns.length >= 1", timeout=60_000)
        first = page.evaluate("window.glmvDemo.turns[0]")
        # the server cancelled the reply when the user spoke; the page said how much was heard
        assert first["status"] == "cancelled", first
        assert first["cutAtMs"] is not None and first["cutAtMs"] > 0, first
        assert first["cutAtMs"] <= first["audioSamples"] / 24, first
        s = stats(page)
        assert s["samplesPlayed"] < s["samplesReceived"] or s["samplesReceived"] == 0, s
        assert s["samplesPlayed"] >= first["cutAtMs"] * 24, s
        assert "interrupted after" in page.inner_text(".transcript li.assistant.cut .meta")
        # the second question is answered
        page.wait_for_function("window.glmvDemo.stats.responses >= 2", timeout=60_000)
        assert page.console_errors == []
    finally:
        browser.close()


def test_stop_button_cancels_the_reply(playwright, talk_stack: LocalStack, tmp_path: Path) -> None:
    wav = speech_wav(tmp_path / "mic.wav", [("speech", 0), ("silence", 40.0)])
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, LONG))
        page.click("#start")
        page.wait_for_function("window.glmvDemo.stats.samplesPlayed > 12000", timeout=120_000)
        page.click("#interrupt")
        page.wait_for_function("window.glmvDemo.turns.length >= 1", timeout=60_000)
        page.wait_for_function("window.glmvDemo.stats.truncated >= 1", timeout=30_000)
        turn = page.evaluate("window.glmvDemo.turns[0]")
        assert turn["status"] in ("cancelled", "completed"), turn
        assert turn["cutAtMs"] >= 500, turn
        assert stats(page)["bargeIns"] == 0
        assert page.console_errors == []
    finally:
        browser.close()
