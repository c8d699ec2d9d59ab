// A streaming windowed-sinc resampler (mono Float32), usable in a worklet or on the page.
// Downsampling low-passes at the output's Nyquist frequency, so 48 kHz -> 24 kHz does not alias.

const ZERO_CROSSINGS = 8;

function sinc(x) {
  if (x === 0) return 1;
  const px = Math.PI * x;
  return Math.sin(px) / px;
}

function blackman(t) {
  // t in [-1, 1]
  return 0.42 + 0.5 * Math.cos(Math.PI * t) + 0.08 * Math.cos(2 * Math.PI * t);
}

export class Resampler {
  constructor(inRate, outRate) {
    if (!(inRate > 0 && outRate > 0)) throw new Error(`bad rates ${inRate} -> ${outRate}`);
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    // cutoff relative to the input's Nyquist frequency, a little below the output's
    this.cutoff = Math.min(1, outRate / inRate) * (outRate < inRate ? 0.92 : 1);
    this.halfWidth = Math.ceil(ZERO_CROSSINGS / this.cutoff);
    this.reset();
  }

  reset() {
    // history of halfWidth zeros, so the first output sits on the first input sample
    this.buf = new Float32Array(Math.max(1024, 4 * this.halfWidth));
    this.len = this.halfWidth;
    this.pos = this.halfWidth; // input position of the next output sample
    this.inputCount = 0;
    this.outputCount = 0;
  }

  // Input samples still needed beyond those given so far before output `n` can be produced:
  // the filter looks this far ahead.
  get lookahead() {
    return this.passthrough ? 0 : this.halfWidth;
  }

  push(input) {
    this.inputCount += input.length;
    if (this.passthrough) {
      this.outputCount += input.length;
      return Float32Array.from(input);
    }
    this._append(input);
    const out = [];
    const w = this.halfWidth;
    const fc = this.cutoff;
    while (Math.floor(this.pos) + w < this.len) {
      const p = this.pos;
      const base = Math.floor(p);
      let acc = 0;
      for (let i = base - w + 1; i <= base + w; i++) {
        const d = p - i;
        acc += this.buf[i] * sinc(fc * d) * blackman(d / (w + 1));
      }
      out.push(acc * fc);
      this.pos += this.step;
    }
    this._trim();
    this.outputCount += out.length;
    return Float32Array.from(out);
  }

  _append(input) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }

  _trim() {
    const keepFrom = Math.floor(this.pos) - this.halfWidth + 1;
    if (keepFrom <= 0) return;
    this.buf.copyWithin(0, keepFrom, this.len);
    this.len -= keepFrom;
    this.pos -= keepFrom;
  }
}

export function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
  }
  return out;
}

export function pcm16ToFloat(pcm) {
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}
