// Microphone capture in the audio thread: mix to mono, resample to the endpoint's rate, convert to
// PCM16 and post fixed-size chunks to the page.
import { Resampler, floatToPcm16 } from "./resampler.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.targetRate = opts.targetRate || 24000;
    this.chunkSamples = Math.round((this.targetRate * (opts.chunkMs || 40)) / 1000);
    this.resampler = new Resampler(sampleRate, this.targetRate);
    this.pending = new Int16Array(this.chunkSamples);
    this.filled = 0;
    this.sumSquares = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "stop") this.running = false;
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const frames = input[0].length;
    const mono = new Float32Array(frames);
    for (const channel of input) {
      for (let i = 0; i < frames; i++) mono[i] += channel[i] / input.length;
    }
    const pcm = floatToPcm16(this.resampler.push(mono));
    let offset = 0;
    while (offset < pcm.length) {
      const take = Math.min(pcm.length - offset, this.chunkSamples - this.filled);
      this.pending.set(pcm.subarray(offset, offset + take), this.filled);
      for (let i = offset; i < offset + take; i++) this.sumSquares += pcm[i] * pcm[i];
      this.filled += take;
      offset += take;
      if (this.filled === this.chunkSamples) {
        const level = Math.sqrt(this.sumSquares / this.chunkSamples) / 32768;
        const buffer = this.pending.buffer;
        this.port.postMessage({ type: "audio", pcm: buffer, level }, [buffer]);
        this.pending = new Int16Array(this.chunkSamples);
        this.filled = 0;
        this.sumSquares = 0;
      }
    }
    return true;
  }
}

registerProcessor("glmv-capture", CaptureProcessor);
