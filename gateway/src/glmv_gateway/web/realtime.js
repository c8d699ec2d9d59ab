// A minimal client of the OpenAI-Realtime-compatible WebSocket (GA event names).

export function bytesToBase64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

export function base64ToBytes(text) {
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

export function realtimeUrl(pageLocation, model) {
  const url = new URL("../v1/realtime", pageLocation);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = `?model=${encodeURIComponent(model)}`;
  return url.toString();
}

// The short-lived client secret the gateway mints for this page (the API key never reaches it).
export async function fetchClientSecret(pageLocation) {
  let response;
  try {
    response = await fetch(new URL("client-secret", pageLocation), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
      cache: "no-store",
    });
  } catch (err) {
    throw new Error(`The server is not reachable (${err.message}). Is the gateway running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const detail = body && (body.error?.message || body.detail || body.message);
    throw new Error(`The server refused a session (HTTP ${response.status}${detail ? `: ${detail}` : ""}).`);
  }
  if (!body || typeof body.value !== "string") throw new Error("The server answered without a client secret.");
  return body;
}

export class RealtimeConnection {
  constructor({ url, secret, onEvent, onClose }) {
    this.url = url;
    this.secret = secret;
    this.onEvent = onEvent;
    this.onClose = onClose;
    this.ws = null;
    this.opened = false;
    this.nextId = 1;
  }

  open() {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(this.url, ["realtime", `openai-insecure-api-key.${this.secret}`]);
      } catch (err) {
        reject(new Error(`Could not open the realtime connection: ${err.message}`));
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        this.opened = true;
        resolve();
      };
      ws.onmessage = (event) => {
        let parsed;
        try {
          parsed = JSON.parse(event.data);
        } catch {
          return;
        }
        this.onEvent(parsed);
      };
      ws.onclose = (event) => {
        if (!this.opened) {
          reject(new Error(`The realtime endpoint closed the connection before it opened (code ${event.code}${event.reason ? `: ${event.reason}` : ""}). Is the server up?`));
        }
        const wasOpen = this.opened;
        this.opened = false;
        this.onClose(event, wasOpen);
      };
      ws.onerror = () => {};
    });
  }

  send(event) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return null;
    const eventId = `evt_page_${this.nextId++}`;
    this.ws.send(JSON.stringify({ event_id: eventId, ...event }));
    return eventId;
  }

  close() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "page closed the session");
  }
}
