// The page's audio graph: microphone -> capture worklet (24 kHz PCM16 chunks), and
// playback worklet (jitter buffer) -> speakers. One AudioContext at the device's rate.

export const WIRE_RATE = 24000;

export class MicrophoneError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

export function explainMicrophoneError(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new MicrophoneError(
      "denied",
      "Microphone access was denied. Allow the microphone for this page (the icon in the address bar), then press Start again.",
    );
  }
  if (name === "NotFoundError" || name === "DevicesNotFoundError" || name === "OverconstrainedError") {
    return new MicrophoneError("missing", "No microphone was found. Connect one and press Start again.");
  }
  if (name === "NotReadableError" || name === "TrackStartError") {
    return new MicrophoneError("busy", "The microphone is in use by another application or could not be opened.");
  }
  return new MicrophoneError("other", `The microphone could not be opened: ${err && err.message ? err.message : err}`);
}

export class AudioIO {
  constructor({ onChunk, onPlayback }) {
    this.onChunk = onChunk; // (Int16Array, level) => void
    this.onPlayback = onPlayback; // (message from the playback worklet) => void
    this.ctx = null;
    this.stream = null;
    this.capture = null;
    this.playback = null;
    this.requests = new Map();
    this.nextRequest = 1;
  }

  async open() {
    if (!window.isSecureContext) {
      throw new MicrophoneError(
        "insecure",
        "This page needs a secure context for the microphone: open it on http://localhost or over https.",
      );
    }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicrophoneError("unsupported", "This browser cannot capture the microphone (no mediaDevices.getUserMedia).");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      throw explainMicrophoneError(err);
    }
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    if (this.ctx.state === "suspended") await this.ctx.resume();
    const base = new URL(".", import.meta.url);
    try {
      await this.ctx.audioWorklet.addModule(new URL("capture-worklet.js", base));
      await this.ctx.audioWorklet.addModule(new URL("playback-worklet.js", base));
    } catch (err) {
      throw new Error(`The server is not reachable: the page could not load its audio code (${err.message}). Is the gateway running?`);
    }
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "glmv-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      processorOptions: { targetRate: WIRE_RATE, chunkMs: 40 },
    });
    this.capture.port.onmessage = (event) => {
      const msg = event.data;
      if (msg.type === "audio") this.onChunk(new Int16Array(msg.pcm), msg.level);
    };
    source.connect(this.capture);
    this.playback = new AudioWorkletNode(this.ctx, "glmv-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { sourceRate: WIRE_RATE, prebufferMs: 80 },
    });
    this.playback.port.onmessage = (event) => {
      const msg = event.data;
      if (msg.id !== undefined && this.requests.has(msg.id)) {
        this.requests.get(msg.id)(msg);
        this.requests.delete(msg.id);
      }
      this.onPlayback(msg);
    };
    this.playback.connect(this.ctx.destination);
    return { sampleRate: this.ctx.sampleRate };
  }

  play(item, floatSamples) {
    if (!this.playback) return;
    const buffer = floatSamples.buffer;
    this.playback.port.postMessage({ type: "chunk", item, samples: buffer }, [buffer]);
  }

  endItem(item) {
    if (this.playback) this.playback.port.postMessage({ type: "end", item });
  }

  _ask(type) {
    return new Promise((resolve) => {
      if (!this.playback) {
        resolve({ played: {} });
        return;
      }
      const id = this.nextRequest++;
      this.requests.set(id, resolve);
      this.playback.port.postMessage({ type, id });
    });
  }

  // Stop playback now; resolves with the samples of each item that were rendered.
  flush() {
    return this._ask("flush");
  }

  progress() {
    return this._ask("query");
  }

  async close() {
    if (this.capture) this.capture.port.postMessage({ type: "stop" });
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.ctx) await this.ctx.close();
    this.ctx = null;
    this.capture = null;
    this.playback = null;
    this.stream = null;
  }
}
