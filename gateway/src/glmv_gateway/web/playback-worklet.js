// Reply playback in the audio thread: a jitter buffer of 24 kHz chunks tagged with their item id,
// resampled to the context's rate. It counts exactly how many samples of each item were rendered,
// so the page can tell the server what the listener heard when the reply is cut.
import { Resampler } from "./resampler.js";

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.sourceRate = opts.sourceRate || 24000;
    this.prebuffer = Math.round((this.sourceRate * (opts.prebufferMs ?? 80)) / 1000);
    this.resampler = new Resampler(this.sourceRate, sampleRate);
    this.queue = []; // {item, data: Float32Array, offset}
    this.buffered = 0; // source samples queued
    this.ended = new Set(); // items whose audio is complete
    this.pulled = new Map(); // item -> source samples fed to the resampler
    this.current = null; // item being rendered
    this.priming = true;
    this.out = new Float32Array(0);
    this.outOffset = 0;
    this.outItems = []; // parallel to `out`: [{item, until}] boundaries in output samples
    this.rendered = 0;
    this.underruns = 0;
    this.lastReport = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "chunk") {
      const data = new Float32Array(msg.samples);
      if (data.length === 0) return;
      this.queue.push({ item: msg.item, data, offset: 0 });
      this.buffered += data.length;
    } else if (msg.type === "end") {
      this.ended.add(msg.item);
    } else if (msg.type === "flush") {
      const played = this.heard();
      this.queue = [];
      this.buffered = 0;
      this.out = new Float32Array(0);
      this.outOffset = 0;
      this.resampler.reset();
      this.priming = true;
      this.current = null;
      this.port.postMessage({ type: "flushed", id: msg.id, played });
    } else if (msg.type === "query") {
      this.port.postMessage({ type: "progress", id: msg.id, played: this.heard(), rendered: this.rendered, underruns: this.underruns });
    }
  }

  // Source samples of each item rendered so far (pulled minus what the filter still holds).
  heard() {
    const result = {};
    for (const [item, count] of this.pulled) {
      result[item] = count;
    }
    if (this.current !== null && result[this.current] !== undefined) {
      const inFlight = this.resampler.lookahead + Math.round((this.out.length - this.outOffset) * (this.sourceRate / sampleRate));
      result[this.current] = Math.max(0, result[this.current] - inFlight);
    }
    return result;
  }

  pull(frames) {
    // source samples for `frames` output samples (plus the filter's lookahead)
    const need = Math.ceil(frames * (this.sourceRate / sampleRate)) + 1;
    if (this.priming) {
      const head = this.queue[0];
      if (!head) return null;
      if (this.buffered < this.prebuffer && !this.ended.has(head.item)) return null;
      this.priming = false;
    }
    const parts = [];
    let got = 0;
    while (got < need && this.queue.length) {
      const head = this.queue[0];
      if (this.current !== head.item) {
        if (this.current !== null) this.port.postMessage({ type: "item-done", item: this.current, played: this.pulled.get(this.current) || 0 });
        this.current = head.item;
        this.resampler.reset();
        this.port.postMessage({ type: "item-start", item: head.item });
      }
      const take = Math.min(need - got, head.data.length - head.offset);
      parts.push(head.data.subarray(head.offset, head.offset + take));
      head.offset += take;
      got += take;
      this.buffered -= take;
      this.pulled.set(head.item, (this.pulled.get(head.item) || 0) + take);
      if (head.offset === head.data.length) this.queue.shift();
      if (this.queue.length && this.queue[0].item !== this.current) break;
    }
    if (got === 0) return null;
    const joined = new Float32Array(got);
    let at = 0;
    for (const p of parts) {
      joined.set(p, at);
      at += p.length;
    }
    return joined;
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const channel = output[0];
    const frames = channel.length;
    let written = 0;
    while (written < frames) {
      if (this.outOffset >= this.out.length) {
        const src = this.pull(frames - written);
        if (src === null) break;
        let fed = src;
        // the item's last samples: push zeros through so the filter's tail is rendered too
        if (this.queue.length === 0 && this.ended.has(this.current)) {
          fed = new Float32Array(src.length + this.resampler.lookahead);
          fed.set(src);
        }
        this.out = this.resampler.push(fed);
        this.outOffset = 0;
        continue;
      }
      const take = Math.min(frames - written, this.out.length - this.outOffset);
      channel.set(this.out.subarray(this.outOffset, this.outOffset + take), written);
      this.outOffset += take;
      written += take;
    }
    if (written > 0) this.rendered += written;
    if (written < frames) {
      channel.fill(0, written);
      const empty = this.queue.length === 0 && this.outOffset >= this.out.length;
      if (empty && this.current !== null) {
        if (this.ended.has(this.current)) {
          this.port.postMessage({ type: "item-done", item: this.current, played: this.pulled.get(this.current) || 0 });
          this.current = null;
          this.resampler.reset();
        } else if (!this.priming) {
          this.underruns += 1;
          this.port.postMessage({ type: "underrun", item: this.current });
        }
        this.priming = true;
      }
    }
    for (let c = 1; c < output.length; c++) output[c].set(channel);
    if (currentTime - this.lastReport > 0.1) {
      this.lastReport = currentTime;
      this.port.postMessage({ type: "progress", played: this.heard(), rendered: this.rendered, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor("glmv-playback", PlaybackProcessor);
