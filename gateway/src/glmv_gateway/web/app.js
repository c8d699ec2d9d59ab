// The talk page: microphone -> realtime WebSocket -> gapless playback, transcripts and per-turn
// latency. Everything a test needs to observe is on window.glmvDemo.
import { AudioIO, WIRE_RATE } from "./audio.js";
import { RealtimeConnection, base64ToBytes, bytesToBase64, fetchClientSecret, realtimeUrl } from "./realtime.js";
import { pcm16ToFloat } from "./resampler.js";
import { pageOverrides, readSettings, sessionUpdate } from "./settings.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  error: $("error"),
  start: $("start"),
  interrupt: $("interrupt"),
  hangup: $("hangup"),
  level: $("level"),
  transcript: $("transcript"),
  settings: $("settings"),
  metrics: $("metrics"),
};

const stats = {
  chunksSent: 0,
  samplesSent: 0,
  samplesReceived: 0,
  samplesPlayed: 0, // reply samples (24 kHz) rendered to the speakers
  itemsPlayed: 0,
  underruns: 0,
  speechStarted: 0,
  speechStopped: 0,
  responses: 0,
  turns: 0, // responses that ended (completed or cut)
  bargeIns: 0,
  truncatesSent: 0,
  truncated: 0, // conversation.item.truncated acknowledging the page's truncates
  serverTruncated: 0, // the server's own cuts of interrupted replies
  errors: 0,
};

const state = {
  phase: "idle", // idle | starting | live | closed
  audio: null,
  conn: null,
  sessionId: null,
  model: null,
  sendLog: [], // [samplesSentSoFar, performance.now()] for mapping server audio times to wall time
  user: null, // the user turn being spoken
  responses: new Map(), // response_id -> turn record
  items: new Map(), // assistant item_id -> {turn, received, played, done, cut}
  activeResponse: null,
  errors: [],
  lastPlayed: {},
};

const turns = [];
window.glmvDemo = {
  stats,
  state,
  turns,
  start,
  hangup,
  interrupt,
  audible: () => audibleItem(),
  settings: () => readSettings(ui.settings),
};

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `status ${kind}`;
}

function showError(message) {
  stats.errors += 1;
  state.errors.push(message);
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function bubble(role) {
  const li = document.createElement("li");
  li.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "assistant";
  const text = document.createElement("span");
  text.className = "text";
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(who, text, meta);
  ui.transcript.append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setButtons() {
  const live = state.phase === "live";
  ui.start.disabled = state.phase === "starting" || live;
  ui.hangup.disabled = !live;
  ui.interrupt.disabled = !live || !(state.activeResponse || audibleItem());
}

function metric(name, value) {
  ui.metrics.querySelector(`[data-metric="${name}"]`).textContent = value;
}

const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);

// --- starting and ending ------------------------------------------------------------------------

async function start() {
  if (state.phase === "starting" || state.phase === "live") return;
  clearError();
  state.phase = "starting";
  setButtons();
  setStatus("Opening the microphone…", "idle");
  const audio = new AudioIO({ onChunk, onPlayback });
  try {
    await audio.open();
  } catch (err) {
    await audio.close().catch(() => {});
    fail(err.message);
    return;
  }
  state.audio = audio;
  setStatus("Connecting…", "idle");
  try {
    const secret = await fetchClientSecret(location.href);
    state.model = secret.model || "glm-4-voice";
    const conn = new RealtimeConnection({
      url: realtimeUrl(location.href, state.model),
      secret: secret.value,
      onEvent,
      onClose,
    });
    state.conn = conn;
    await conn.open();
  } catch (err) {
    await teardown();
    fail(err.message);
    return;
  }
  state.phase = "live";
  state.sendLog = [];
  state.conn.send(sessionUpdate(readSettings(ui.settings), pageOverrides(location.search)));
  setStatus("Listening", "live");
  setButtons();
}

function fail(message) {
  state.phase = "closed";
  showError(message);
  setStatus("Not connected", "error");
  setButtons();
}

async function teardown() {
  const { audio, conn } = state;
  state.audio = null;
  state.conn = null;
  if (conn) conn.close();
  if (audio) await audio.close().catch(() => {});
  ui.level.style.width = "0";
}

async function hangup() {
  state.phase = "closed";
  await teardown();
  setStatus("Not connected", "idle");
  setButtons();
}

function onClose(event, wasOpen) {
  if (!wasOpen || state.phase !== "live") return;
  state.phase = "closed";
  teardown();
  showError(
    `The connection to the server was lost (code ${event.code}${event.reason ? `: ${event.reason}` : ""}). Press Start to reconnect.`,
  );
  setStatus("Disconnected", "error");
  setButtons();
}

// --- microphone -----------------------------------------------------------------------------------

function onChunk(pcm, level) {
  ui.level.style.width = `${Math.min(100, Math.round(level * 400))}%`;
  if (state.phase !== "live" || !state.conn) return;
  state.conn.send({ type: "input_audio_buffer.append", audio: bytesToBase64(new Uint8Array(pcm.buffer)) });
  stats.chunksSent += 1;
  stats.samplesSent += pcm.length;
  state.sendLog.push([stats.samplesSent, performance.now()]);
  if (state.sendLog.length > 3000) state.sendLog.splice(0, 1000);
}

// Wall time at which the microphone sample at `audioMs` (session input time) was sent.
function sentAt(audioMs) {
  const sample = (audioMs * WIRE_RATE) / 1000;
  for (const [count, when] of state.sendLog) if (count >= sample) return when;
  return null;
}

// --- playback -------------------------------------------------------------------------------------

function countPlayed() {
  let total = 0;
  for (const v of Object.values(state.lastPlayed)) total += v;
  stats.samplesPlayed = total;
}

function onPlayback(msg) {
  if (msg.type === "progress" || msg.type === "flushed") {
    state.lastPlayed = msg.played || {};
    countPlayed();
    if (msg.underruns !== undefined) stats.underruns = msg.underruns;
  } else if (msg.type === "item-start") {
    const item = state.items.get(msg.item);
    if (item && item.turn.playedAt === null) {
      item.turn.playedAt = performance.now();
    }
  } else if (msg.type === "item-done") {
    const item = state.items.get(msg.item);
    if (item && !item.done) {
      item.done = true;
      stats.itemsPlayed += 1;
    }
    state.lastPlayed[msg.item] = msg.played;
    countPlayed();
    setButtons();
  }
}

function audibleItem() {
  for (const [id, item] of state.items) if (item.received > 0 && !item.done && !item.cut) return id;
  return null;
}

// Cut the reply: stop playback now and tell the server exactly how much of it was heard.
async function interrupt(reason = "button") {
  if (!state.audio || !state.conn) return;
  if (reason === "button" && state.activeResponse) {
    state.conn.send({ type: "response.cancel" });
  }
  const itemId = audibleItem();
  const item = itemId ? state.items.get(itemId) : null;
  if (item) item.cut = true; // later deltas of this item are dropped
  const { played } = await state.audio.flush();
  if (!item) return;
  const heard = played[itemId] || 0;
  const audioEndMs = Math.floor((Math.min(heard, item.received) * 1000) / WIRE_RATE);
  item.sentEndMs = audioEndMs;
  state.conn.send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: audioEndMs });
  stats.truncatesSent += 1;
  if (reason === "speech") stats.bargeIns += 1;
  item.turn.cutAtMs = audioEndMs;
  if (item.turn.record) item.turn.record.cutAtMs = audioEndMs; // its response had already ended
  item.turn.bubble.classList.add("cut");
  item.turn.bubble.querySelector(".meta").textContent = `interrupted after ${(audioEndMs / 1000).toFixed(2)} s`;
  setButtons();
}

// --- server events --------------------------------------------------------------------------------

function turnFor(event) {
  return state.responses.get(event.response_id) || null;
}

function onEvent(event) {
  switch (event.type) {
    case "session.created":
    case "session.updated":
      state.sessionId = event.session && event.session.id;
      break;
    case "input_audio_buffer.speech_started": {
      stats.speechStarted += 1;
      if (audibleItem()) interrupt("speech");
      const li = bubble("user");
      li.querySelector(".text").textContent = "speaking…";
      state.user = { itemId: event.item_id, startMs: event.audio_start_ms, bubble: li, transcript: "" };
      break;
    }
    case "input_audio_buffer.speech_stopped": {
      stats.speechStopped += 1;
      const now = performance.now();
      const mapped = typeof event.audio_end_ms === "number" ? sentAt(event.audio_end_ms) : null;
      const user = state.user || { bubble: bubble("user"), transcript: "" };
      user.endedAt = mapped !== null ? Math.min(mapped, now) : now;
      if (typeof event.audio_end_ms === "number" && typeof user.startMs === "number") {
        const seconds = (event.audio_end_ms - user.startMs) / 1000;
        if (!user.transcript) user.bubble.querySelector(".text").textContent = "(speech)";
        user.bubble.querySelector(".meta").textContent = `${seconds.toFixed(1)} s`;
      }
      state.user = user;
      break;
    }
    case "conversation.item.input_audio_transcription.delta":
    case "conversation.item.input_audio_transcription.completed": {
      const user = state.user && state.user.itemId === event.item_id ? state.user : null;
      if (user) {
        user.transcript = event.transcript !== undefined ? event.transcript : user.transcript + (event.delta || "");
        user.bubble.querySelector(".text").textContent = user.transcript;
      }
      break;
    }
    case "response.created": {
      stats.responses += 1;
      const user = state.user;
      const turn = {
        responseId: event.response.id,
        itemId: null,
        speechEndedAt: user && user.endedAt !== undefined ? user.endedAt : performance.now(),
        firstAudioAt: null,
        playedAt: null,
        doneAt: null,
        text: "",
        audioSamples: 0,
        status: "in_progress",
        usage: null,
        cutAtMs: null,
        record: null,
        bubble: bubble("assistant"),
      };
      state.user = null;
      state.responses.set(turn.responseId, turn);
      state.activeResponse = turn.responseId;
      setButtons();
      break;
    }
    case "response.output_item.added": {
      const turn = turnFor(event);
      if (turn && event.item && event.item.type === "message") {
        turn.itemId = event.item.id;
        state.items.set(event.item.id, { turn, received: 0, done: false, cut: false });
      }
      break;
    }
    case "response.output_audio.delta": {
      const item = state.items.get(event.item_id);
      if (!item || item.cut) break;
      const bytes = base64ToBytes(event.delta);
      const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
      item.received += pcm.length;
      item.turn.audioSamples += pcm.length;
      stats.samplesReceived += pcm.length;
      if (item.turn.firstAudioAt === null) {
        item.turn.firstAudioAt = performance.now();
        metric("first-audio", ms(item.turn.firstAudioAt - item.turn.speechEndedAt));
      }
      state.audio.play(event.item_id, pcm16ToFloat(pcm));
      setButtons();
      break;
    }
    case "response.output_audio.done":
      if (state.audio && event.item_id) state.audio.endItem(event.item_id);
      break;
    case "response.output_audio_transcript.delta": {
      const item = state.items.get(event.item_id);
      const turn = item ? item.turn : turnFor(event);
      if (!turn || (item && item.cut)) break;
      turn.text += event.delta || "";
      turn.bubble.querySelector(".text").textContent = turn.text;
      break;
    }
    case "response.done":
      finishTurn(event.response);
      break;
    case "conversation.item.truncated": {
      // the server may cut an interrupted reply itself; count the acknowledgements of ours
      const item = state.items.get(event.item_id);
      if (item && item.sentEndMs === event.audio_end_ms) stats.truncated += 1;
      else stats.serverTruncated += 1;
      break;
    }
    case "error":
      showError(`Server error${event.error && event.error.code ? ` (${event.error.code})` : ""}: ${event.error ? event.error.message : "unknown"}`);
      break;
    default:
      break;
  }
}

function finishTurn(response) {
  const turn = state.responses.get(response.id);
  if (!turn) return;
  turn.doneAt = performance.now();
  turn.status = response.status;
  turn.usage = response.usage || null;
  if (state.activeResponse === response.id) state.activeResponse = null;
  if (turn.itemId && state.audio) state.audio.endItem(turn.itemId);
  const details = (turn.usage && turn.usage.output_token_details) || {};
  const record = {
    responseId: turn.responseId,
    itemId: turn.itemId,
    status: turn.status,
    reason: response.status_details && response.status_details.reason,
    firstAudioMs: turn.firstAudioAt === null ? null : turn.firstAudioAt - turn.speechEndedAt,
    firstPlayedMs: turn.playedAt === null ? null : turn.playedAt - turn.speechEndedAt,
    totalMs: turn.doneAt - turn.speechEndedAt,
    audioTokens: details.audio_tokens ?? null,
    textTokens: details.text_tokens ?? null,
    audioSamples: turn.audioSamples,
    text: turn.text,
    cutAtMs: turn.cutAtMs,
  };
  turn.record = record;
  turns.push(record);
  stats.turns += 1;
  metric("total", ms(record.totalMs));
  metric("audio-tokens", record.audioTokens ?? "–");
  metric("text-tokens", record.textTokens ?? "–");
  const reasons = { max_output_tokens: "token limit", turn_detected: "you spoke", client_cancelled: "stopped" };
  metric("status", record.reason ? `${record.status}: ${reasons[record.reason] || record.reason}` : record.status);
  if (record.firstAudioMs === null) metric("first-audio", "–");
  const meta = turn.bubble.querySelector(".meta");
  if (!turn.bubble.classList.contains("cut")) {
    const parts = [];
    if (record.firstAudioMs !== null) parts.push(`first audio ${ms(record.firstAudioMs)}`);
    parts.push(`total ${ms(record.totalMs)}`);
    if (record.audioTokens !== null) parts.push(`${record.audioTokens} audio / ${record.textTokens} text tokens`);
    meta.textContent = parts.join(" · ");
  }
  if (response.status === "failed") {
    const err = response.status_details && response.status_details.error;
    showError(`The reply failed: ${err && err.message ? err.message : "server error"}`);
  }
  setButtons();
}

// --- wiring ---------------------------------------------------------------------------------------

ui.start.addEventListener("click", () => start());
ui.hangup.addEventListener("click", () => hangup());
ui.interrupt.addEventListener("click", () => interrupt("button"));
const initial = pageOverrides(location.search);
if (initial.temperature !== undefined) {
  ui.settings.elements.temperature.value = String(initial.temperature);
  ui.settings.elements.temperatureValue.value = initial.temperature.toFixed(2);
}
ui.settings.addEventListener("input", () => {
  const settings = readSettings(ui.settings);
  ui.settings.elements.temperatureValue.value = settings.temperature.toFixed(2);
  if (state.phase === "live" && state.conn) state.conn.send(sessionUpdate(settings, pageOverrides(location.search)));
});
setButtons();
