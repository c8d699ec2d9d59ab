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
BARGE = "seed=5&max_output_tokens=1200&top_p=1&temperature=1"
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
    wav = speech_wav(tmp_path / "mic.wav", [("speech", 0), ("silence", 15.0)])
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, SHORT))
        page.click("#start")
        page.wait_for_function("window.glmvDemo.state.phase === 'live'", timeout=30_000)
        # the end of the question is found by the server's VAD: nothing is clicked
        page.wait_for_function("window.glmvDemo.stats.speechStopped >= 1", timeout=60_000)
        page.wait_for_function("window.glmvDemo.turns.length >= 1", timeout=120_000)
        turn = page.evaluate("window.glmvDemo.turns[0]")
        assert turn["status"] in ("completed", "incomplete"), turn  # incomplete: the token limit
        assert turn["audioTokens"] > 0 and turn["textTokens"] is not None, turn
        assert turn["audioSamples"] > 0
        assert 0 < turn["firstAudioMs"] <= turn["totalMs"], turn
        # every received sample is played, through the page's own playback counters
        page.wait_for_function("window.glmvDemo.stats.itemsPlayed >= 1", timeout=60_000)
        s = stats(page)
        assert s["samplesPlayed"] == s["samplesReceived"] == turn["audioSamples"], s
        assert s["chunksSent"] > 0 and s["errors"] == 0, s
        # the transcript and the latency figures are on the page
        assert page.inner_text(".transcript li.user .text") == "(speech)"
        assert page.inner_text(".transcript li.assistant .text") == turn["text"]
        assert "first audio" in page.inner_text(".transcript li.assistant .meta")
        assert page.inner_text('[data-metric="first-audio"]').endswith(" ms")
        assert page.inner_text('[data-metric="audio-tokens"]') == str(turn["audioTokens"])
        assert page.inner_text('[data-metric="status"]').startswith(turn["status"])
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
    # The question again and again with short pauses: each pause ends a turn, and the next question
    # starts while that turn's reply is playing (dev replies vary in length: some cycles may finish
    # or be cancelled before any audio, the test waits for one that is cut while heard).
    wav = speech_wav(tmp_path / "mic.wav", [("speech", 0), ("silence", 1.5)])
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, BARGE))
        page.click("#start")
        page.wait_for_function("window.glmvDemo.stats.bargeIns >= 1", timeout=150_000)
        page.wait_for_function("window.glmvDemo.stats.truncated >= 1", timeout=30_000)
        page.wait_for_function("window.glmvDemo.turns.some((t) => t.cutAtMs !== null)", timeout=60_000)
        cut = page.evaluate("window.glmvDemo.turns.find((t) => t.cutAtMs !== null)")
        # the server cancelled the reply (or it had all arrived); the page said how much was heard
        assert cut["status"] in ("cancelled", "completed", "incomplete"), cut
        assert 0 <= cut["cutAtMs"] <= cut["audioSamples"] / 24, cut
        s = stats(page)
        assert cut["cutAtMs"] * 24 <= s["samplesPlayed"] <= s["samplesReceived"], s
        assert "interrupted after" in page.inner_text(".transcript li.assistant.cut .meta")
        assert s["truncated"] == s["truncatesSent"], s
        assert page.console_errors == []
    finally:
        browser.close()


def test_stop_button_cuts_the_reply(playwright, talk_stack: LocalStack, tmp_path: Path) -> None:
    wav = speech_wav(tmp_path / "mic.wav", [("speech", 0), ("silence", 6.0)])
    browser = launch(playwright, wav=wav)
    try:
        page = browser.page(page_url(talk_stack, LONG))
        page.click("#start")
        # some dev replies are too short to be caught playing: try the next turn then
        for _ in range(6):
            page.wait_for_function("window.glmvDemo.audible() !== null", timeout=90_000, polling=10)
            page.click("#interrupt")
            try:
                page.wait_for_function("window.glmvDemo.stats.truncatesSent >= 1", timeout=2_000)
                break
            except Exception:  # the reply ended before the click landed
                continue
        page.wait_for_function("window.glmvDemo.stats.truncated >= 1", timeout=30_000)
        page.wait_for_function("window.glmvDemo.turns.some((t) => t.cutAtMs !== null)", timeout=60_000)
        cut = page.evaluate("window.glmvDemo.turns.find((t) => t.cutAtMs !== null)")
        assert cut["status"] in ("cancelled", "completed", "incomplete"), cut
        assert 0 <= cut["cutAtMs"] <= cut["audioSamples"] / 24, cut
        assert stats(page)["bargeIns"] == 0
        assert page.console_errors == []
    finally:
        browser.close()
