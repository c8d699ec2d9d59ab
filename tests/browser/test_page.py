"""The talk page in a real Chromium, without the model services: serving, the audio worklets,
and the errors a person sees (microphone denied, server down)."""

from __future__ import annotations

import httpx
import pytest

from glmv_gateway.settings import GatewaySettings

from .conftest import Gateway, launch, start_gateway

pytestmark = pytest.mark.browser


def test_page_is_off_unless_enabled(tmp_path) -> None:
    assert GatewaySettings().demo_page is False  # container images run with the defaults
    gateway = start_gateway(tmp_path, GLMV_GATEWAY_DEMO_PAGE="false")
    try:
        for path in ("/", "/demo/", "/demo/app.js"):
            assert httpx.get(f"{gateway.url}{path}", timeout=10).status_code == 404, path
        assert httpx.post(f"{gateway.url}/demo/client-secret", json={}, timeout=10).status_code == 404
    finally:
        gateway.stop()


def test_page_routes(page_gateway: Gateway) -> None:
    with httpx.Client(base_url=page_gateway.url, timeout=10) as http:
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "demo/"
        page = http.get("/demo/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "app.js" in page.text and "dev-key" not in page.text
        for name in ("app.js", "audio.js", "realtime.js", "capture-worklet.js", "playback-worklet.js"):
            asset = http.get(f"/demo/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
        assert http.get("/demo/__init__.py").status_code == 404
        assert http.get("/demo/..%2Fsettings.py").status_code == 404
        # another site's page cannot mint a secret through a visitor's browser
        foreign = http.post("/demo/client-secret", headers={"Origin": "https://evil.example"}, json={})
        assert foreign.status_code == 403
        cross = http.post("/demo/client-secret", headers={"Sec-Fetch-Site": "cross-site"}, json={})
        assert cross.status_code == 403


def test_page_without_a_key_says_so(tmp_path) -> None:
    gateway = start_gateway(tmp_path, GLMV_GATEWAY_DEMO_API_KEY="")
    try:
        response = httpx.post(f"{gateway.url}/demo/client-secret", json={}, timeout=10)
        assert response.status_code == 503
        assert "GLMV_GATEWAY_DEMO_API_KEY" in response.json()["error"]["message"]
    finally:
        gateway.stop()


def test_page_loads_without_console_errors(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright)
    try:
        page = browser.page(f"{page_gateway.url}/")
        page.wait_for_function("window.glmvDemo !== undefined")
        assert page.url.endswith("/demo/")
        assert page.is_enabled("#start") and page.is_disabled("#hangup")
        assert page.evaluate("window.glmvDemo.stats.errors") == 0
        assert page.console_errors == []
    finally:
        browser.close()


def test_denied_microphone_shows_the_message(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright, microphone=False)
    try:
        page = browser.page(f"{page_gateway.url}/demo/")
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        message = page.inner_text("#error")
        assert "Microphone access was denied" in message
        assert page.evaluate("window.glmvDemo.state.phase") == "closed"
        assert page.is_enabled("#start")  # the person can try again
    finally:
        browser.close()


def test_server_down_shows_the_message(playwright, tmp_path) -> None:
    gateway = start_gateway(tmp_path)
    browser = launch(playwright)
    try:
        page = browser.page(f"{gateway.url}/demo/")
        page.wait_for_function("window.glmvDemo !== undefined")
        gateway.stop()
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        assert "server is not reachable" in page.inner_text("#error")
        assert page.inner_text("#status") == "Not connected"
        assert page.evaluate("window.glmvDemo.stats.chunksSent") == 0
    finally:
        browser.close()
        gateway.stop()


RESAMPLE_JS = """
async () => {
  const { Resampler } = await import('./resampler.js');
  function run(inRate, outRate, freq, seconds) {
    const r = new Resampler(inRate, outRate);
    const n = Math.round(inRate * seconds);
    const x = new Float32Array(n);
    for (let i = 0; i < n; i++) x[i] = 0.5 * Math.sin(2 * Math.PI * freq * i / inRate);
    const parts = [];
    for (let at = 0; at < n; at += 128) parts.push(r.push(x.subarray(at, Math.min(n, at + 128))));
    const y = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0; for (const p of parts) { y.set(p, o); o += p.length; }
    const mid = y.subarray(Math.floor(y.length / 4), Math.floor(3 * y.length / 4));
    let crossings = 0, sq = 0;
    for (let i = 1; i < mid.length; i++) if ((mid[i - 1] < 0) !== (mid[i] < 0)) crossings++;
    for (const v of mid) sq += v * v;
    const measured = crossings / 2 / (mid.length / outRate);
    return { length: y.length, freq: measured, rms: Math.sqrt(sq / mid.length) };
  }
  return {
    down: run(48000, 24000, 1000, 1), odd: run(44100, 24000, 440, 1), up: run(24000, 48000, 440, 1),
    alias: run(48000, 24000, 15000, 1),
  };
}
"""


def test_resampler_in_the_browser(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright)
    try:
        page = browser.page(f"{page_gateway.url}/demo/")
        result = page.evaluate(RESAMPLE_JS)
        sine_rms = 0.5 / 2**0.5
        for name, rate, freq in (("down", 24000, 1000), ("odd", 24000, 440), ("up", 48000, 440)):
            r = result[name]
            assert abs(r["length"] - rate) <= 40, (name, r)  # the filter's lookahead is still held
            assert abs(r["freq"] - freq) / freq < 0.01, (name, r)
            assert abs(r["rms"] - sine_rms) < 0.01, (name, r)
        # 15 kHz is above the 12 kHz Nyquist frequency of 24 kHz: filtered out, not aliased to 9 kHz
        assert result["alias"]["rms"] < 0.02 * sine_rms, result["alias"]
    finally:
        browser.close()


# Playback worklet -> capture worklet inside one AudioContext: what the jitter buffer renders is
# recorded back at 24 kHz, so gaps and the "heard" count can be checked sample-exactly.
LOOPBACK_JS = """
async ({ total, flushAfter }) => {
  const ctx = new AudioContext();
  await ctx.resume();
  await ctx.audioWorklet.addModule('playback-worklet.js');
  await ctx.audioWorklet.addModule('capture-worklet.js');
  const play = new AudioWorkletNode(ctx, 'glmv-playback', { numberOfInputs: 0, numberOfOutputs: 1,
    outputChannelCount: [1], processorOptions: { sourceRate: 24000, prebufferMs: 80 } });
  const cap = new AudioWorkletNode(ctx, 'glmv-capture', { numberOfInputs: 1, numberOfOutputs: 0,
    processorOptions: { targetRate: 24000, chunkMs: 20 } });
  play.connect(cap);
  const recorded = [];
  cap.port.onmessage = (e) => { if (e.data.type === 'audio') recorded.push(new Int16Array(e.data.pcm)); };
  let last = null, resolveDone, resolveFlush, started = 0;
  const done = new Promise((r) => { resolveDone = r; });
  const flushed = new Promise((r) => { resolveFlush = r; });
  play.port.onmessage = (e) => {
    const m = e.data;
    if (m.type === 'progress') last = m;
    if (m.type === 'item-start') started++;
    if (m.type === 'item-done') resolveDone(m);
    if (m.type === 'flushed') resolveFlush(m);
  };
  const sine = new Float32Array(total);
  for (let i = 0; i < total; i++) sine[i] = 0.5 * Math.sin(2 * Math.PI * 440 * i / 24000);
  const sizes = [240, 480, 1000, 333, 720, 97];
  let at = 0, k = 0, result;
  while (at < total) {
    const n = Math.min(sizes[k++ % sizes.length], total - at);
    play.port.postMessage({ type: 'chunk', item: 'item_a', samples: sine.slice(at, at + n).buffer });
    at += n;
    await new Promise((r) => setTimeout(r, n / 48));  // twice real time, ragged
  }
  if (flushAfter === null) {
    play.port.postMessage({ type: 'end', item: 'item_a' });
    result = await done;
    result = { played: result.played };
  } else {
    const t0 = performance.now();
    while ((!last || (last.played.item_a || 0) < flushAfter) && performance.now() - t0 < 20000) {
      await new Promise((r) => setTimeout(r, 5));
    }
    play.port.postMessage({ type: 'flush', id: 1 });
    result = { played: (await flushed).played.item_a };
  }
  await new Promise((r) => setTimeout(r, 300));  // let the capture side drain
  await ctx.close();
  const all = [];
  for (const c of recorded) for (const v of c) all.push(v / 32768);
  let first = -1, lastLoud = -1;
  for (let i = 0; i < all.length; i++) {
    if (Math.abs(all[i]) > 0.02) { if (first < 0) first = i; lastLoud = i; }
  }
  let maxStep = 0;
  for (let i = first + 1; i <= lastLoud; i++) maxStep = Math.max(maxStep, Math.abs(all[i] - all[i - 1]));
  return { ...result, span: lastLoud - first + 1, maxStep, started, underruns: last ? last.underruns : null,
           rate: ctx.sampleRate };
}
"""


def test_playback_is_gapless_and_counts_every_sample(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright)
    try:
        page = browser.page(f"{page_gateway.url}/demo/")
        r = page.evaluate(LOOPBACK_JS, {"total": 24000, "flushAfter": None})
        assert r["played"] == 24000, r
        assert r["started"] == 1, r
        # one second of sine rendered as one second, no gap: a 440 Hz sine at 0.5 moves at most
        # 0.058 per 24 kHz sample; a gap or a dropped chunk would jump by up to 0.5
        assert abs(r["span"] - 24000) < 60, r
        assert r["maxStep"] < 0.08, r
        assert page.console_errors == []
    finally:
        browser.close()


def test_flush_reports_exactly_what_was_heard(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright)
    try:
        page = browser.page(f"{page_gateway.url}/demo/")
        r = page.evaluate(LOOPBACK_JS, {"total": 48000, "flushAfter": 9600})
        assert 9600 <= r["played"] < 48000, r
        # the count the page sends in conversation.item.truncate is what was rendered (±5 ms)
        assert abs(r["span"] - r["played"]) <= 120, r
    finally:
        browser.close()


URLS_JS = """
async () => {
  const { realtimeUrl } = await import('./realtime.js');
  return [
    realtimeUrl('http://localhost:8080/demo/', 'glm-4-voice'),
    realtimeUrl('https://voice.example.com/demo/?seed=7', 'glm-4-voice'),
    realtimeUrl('https://example.com/glmv/demo/', 'a b'),
  ];
}
"""


def test_websocket_url_follows_the_page_over_http_and_tls(playwright, page_gateway: Gateway) -> None:
    browser = launch(playwright)
    try:
        page = browser.page(f"{page_gateway.url}/demo/")
        assert page.evaluate(URLS_JS) == [
            "ws://localhost:8080/v1/realtime?model=glm-4-voice",
            "wss://voice.example.com/v1/realtime?model=glm-4-voice",
            "wss://example.com/glmv/v1/realtime?model=a%20b",  # behind a proxy under a path prefix
        ]
    finally:
        browser.close()
