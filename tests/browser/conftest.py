"""A real Chromium (Debian's package, driven by Playwright) against the gateway's talk page.

Where Chromium cannot be launched every test here skips with the reason (``-ra`` prints it).
"""

from __future__ import annotations

import os
import subprocess
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from glmv_gateway.stack import free_port, script

from ..conftest import REDIS_PORT

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "question.wav"
CHROMIUM = os.environ.get("GLMV_CHROMIUM", "/usr/bin/chromium")
PAGE_KEY = "browser-test-key"
FAKE_MIC = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
COMMON_ARGS = ["--autoplay-policy=no-user-gesture-required", "--no-sandbox"]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        rate = f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return data, rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype("<i2").tobytes())
    return path


def speech_wav(path: Path, pattern: list[tuple[str, float]]) -> Path:
    """The fake microphone's input: the sample question and silences, e.g. [("speech", 0),
    ("silence", 6.0)]. Chromium loops the file."""
    speech, rate = read_wav(SAMPLE)
    parts = [speech if kind == "speech" else np.zeros(int(s * rate), dtype="<i2") for kind, s in pattern]
    return write_wav(path, np.concatenate(parts), rate)


@pytest.fixture(scope="module")  # its event loop must not outlive the module: async tests follow
def playwright() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"browser tests SKIPPED: no Chromium at {CHROMIUM} (scripts/ensure-chromium.sh installs Debian's "
            "chromium with apt; it could not on this machine)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - requirements-dev pins it
        pytest.skip(f"browser tests SKIPPED: playwright is not installed ({exc})")
    with sync_playwright() as p:
        try:
            probe = p.chromium.launch(executable_path=CHROMIUM, args=COMMON_ARGS)
        except Exception as exc:
            pytest.skip(f"browser tests SKIPPED: Chromium at {CHROMIUM} does not start: {exc}")
        probe.close()
        yield p


@dataclass
class Browser:
    """One Chromium with its own fake microphone; pages collect console errors."""

    browser: object
    context: object

    def page(self, url: str):
        page = self.context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"))
        page.goto(url)
        return page

    def close(self) -> None:
        self.context.close()
        self.browser.close()


def launch(playwright, *, wav: Path | None = None, microphone: bool = True) -> Browser:
    args = list(COMMON_ARGS)
    if microphone:
        args += FAKE_MIC
        if wav is not None:
            args.append(f"--use-file-for-fake-audio-capture={wav}")
    else:
        args += ["--use-fake-device-for-media-stream", "--deny-permission-prompts"]
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
    # the page's Content-Security-Policy forbids eval, which Playwright's waits use
    context = browser.new_context(bypass_csp=True)
    return Browser(browser, context)


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(tmp: Path, **env: str) -> Gateway:
    """The gateway alone (no model services) with the talk page on."""
    port = free_port()
    log = tmp / f"gateway-{port}.log"
    full = {
        **os.environ,
        "GLMV_GATEWAY_HOST": "127.0.0.1",
        "GLMV_GATEWAY_PORT": str(port),
        "GLMV_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/12",
        "GLMV_GATEWAY_TOKENIZER_ADDR": f"127.0.0.1:{free_port()}",
        "GLMV_GATEWAY_LM_ADDR": f"127.0.0.1:{free_port()}",
        "GLMV_GATEWAY_DECODER_ADDR": f"127.0.0.1:{free_port()}",
        "GLMV_GATEWAY_API_KEYS": PAGE_KEY,
        "GLMV_GATEWAY_DEMO_PAGE": "true",
        "GLMV_GATEWAY_DEMO_API_KEY": PAGE_KEY,
        "GLMV_GATEWAY_LOG_FORMAT": "text",
        **env,
    }
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([script("glmv"), "gateway"], env=full, stdout=out, stderr=subprocess.STDOUT)
    gateway = Gateway(proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=2).status_code == 200:
                return gateway
        except httpx.HTTPError:
            time.sleep(0.1)
    gateway.stop()
    raise RuntimeError("gateway did not answer /healthz in 60 s")


@pytest.fixture(scope="module")
def page_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("page-gateway"))
    yield gateway
    gateway.stop()
