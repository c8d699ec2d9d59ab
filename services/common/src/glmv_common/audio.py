"""Audio decoding, encoding and resampling for every audio boundary of the stack.

Samples are float32 in [-1, 1]; multi-channel audio is shaped ``[frames, channels]``. Anything that
cannot be turned into finite samples at a sane rate raises :class:`AudioError` naming the problem.
"""

from __future__ import annotations

import enum
import io
import re
import struct

import numpy as np
import soundfile as sf
import soxr

from glmv_common.errors import AudioError

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 32


class Encoding(enum.IntEnum):
    """Raw sample encodings; values equal ``glmvoice.v1.AudioEncoding``."""

    PCM16 = 1
    FLOAT32 = 2
    MULAW = 3
    ALAW = 4

    @classmethod
    def parse(cls, value: str | int | Encoding) -> Encoding:
        """Accept an enum, its proto number or a name such as ``pcm16``, ``s16le``, ``mulaw``, ``alaw``."""
        if isinstance(value, Encoding):
            return value
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise AudioError(f"unknown audio encoding number {value}") from None
        key = value.strip().lower().replace("-", "").replace("_", "")
        aliases = {
            "pcm16": cls.PCM16,
            "s16le": cls.PCM16,
            "pcms16le": cls.PCM16,
            "l16": cls.PCM16,
            "pcm": cls.PCM16,
            "float32": cls.FLOAT32,
            "f32le": cls.FLOAT32,
            "pcmf32le": cls.FLOAT32,
            "float": cls.FLOAT32,
            "mulaw": cls.MULAW,
            "ulaw": cls.MULAW,
            "pcmu": cls.MULAW,
            "g711ulaw": cls.MULAW,
            "alaw": cls.ALAW,
            "pcma": cls.ALAW,
            "g711alaw": cls.ALAW,
        }
        if key not in aliases:
            raise AudioError(f"unknown audio encoding {value!r}; use pcm16, float32, mulaw or alaw")
        return aliases[key]

    @property
    def bytes_per_sample(self) -> int:
        return {Encoding.PCM16: 2, Encoding.FLOAT32: 4, Encoding.MULAW: 1, Encoding.ALAW: 1}[self]


# --- G.711 (ITU-T) companding, vectorised -------------------------------------------------------

_MULAW_BIAS = 0x84


def _mulaw_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


_MULAW_TABLE = _mulaw_decode_table()
_ALAW_TABLE = _alaw_decode_table()


_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM → G.711 mu-law (14-bit magnitude, bias 33, 8 segments)."""
    x = pcm.astype(np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(x), 8159) + 33
    seg = np.searchsorted(_ULAW_SEG_END, magnitude)
    code = (np.minimum(seg, 7) << 4) | ((magnitude >> (np.minimum(seg, 7) + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM → G.711 A-law (13-bit magnitude, 8 segments, even bits inverted)."""
    x = pcm.astype(np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    magnitude = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, magnitude)
    segc = np.minimum(seg, 7)
    mantissa = np.where(segc < 2, magnitude >> 1, magnitude >> np.maximum(segc, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (segc << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


# --- validation --------------------------------------------------------------------------------


def check_sample_rate(sample_rate: int) -> int:
    if not isinstance(sample_rate, int | np.integer) or isinstance(sample_rate, bool):
        raise AudioError(f"sample rate must be an integer, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= int(sample_rate) <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {sample_rate} Hz is out of range ({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
        )
    return int(sample_rate)


def check_channels(channels: int) -> int:
    if not 1 <= int(channels) <= MAX_CHANNELS:
        raise AudioError(f"channel count {channels} is out of range (1..{MAX_CHANNELS})")
    return int(channels)


def check_samples(x: np.ndarray, *, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as float32 after checking it is non-empty and finite."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise AudioError(f"audio samples must be numeric, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise AudioError(f"audio must be 1-D (mono) or 2-D [frames, channels], got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise AudioError("audio is empty (no samples)")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are rejected below
        arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise AudioError("audio contains NaN or infinite samples")
    return arr


# --- decoding ----------------------------------------------------------------------------------


def decode_pcm(data: bytes, encoding: Encoding | str | int, channels: int = 1) -> np.ndarray:
    """Raw interleaved samples → float32 ``[frames, channels]``."""
    enc = Encoding.parse(encoding)
    channels = check_channels(channels)
    frame_bytes = enc.bytes_per_sample * channels
    if len(data) % frame_bytes:
        raise AudioError(
            f"{len(data)} bytes is not a whole number of {enc.name} frames "
            f"({frame_bytes} bytes per frame for {channels} channel(s)): truncated or wrong encoding"
        )
    if enc is Encoding.PCM16:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif enc is Encoding.FLOAT32:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif enc is Encoding.MULAW:
        samples = _MULAW_TABLE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0
    else:
        samples = _ALAW_TABLE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0
    return check_samples(samples.reshape(-1, channels), allow_empty=True)


def sniff_format(data: bytes) -> str | None:
    """The container the bytes start with: ``wav``, ``flac``, ``ogg``, or None if none of those."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    return None


_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed WAVs write 0 or -1 when the length is not known yet


def check_wav_complete(data: bytes) -> None:
    """Raise AudioError when a RIFF/WAVE file's ``data`` chunk declares more bytes than are present
    (a file cut off mid-data) or when it has no ``data`` chunk at all."""
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk_id == b"data":
            present = len(data) - pos - 8
            if data[:4] == b"RIFF" and size not in _UNKNOWN_SIZES and present < size:
                raise AudioError(
                    f"cannot decode audio file: the WAV file is truncated: its data chunk declares "
                    f"{size} bytes but only {present} are present"
                )
            return
        pos += 8 + size + (size & 1)
    raise AudioError("cannot decode audio file: the WAV file has no data chunk (truncated?)")


def _describe(exc: BaseException) -> str:
    """libsndfile's message without the repr of the in-memory file it was given."""
    text = getattr(exc, "error_string", None) or str(exc)
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>:?", "", text).strip() or type(exc).__name__


def decode_file(data: bytes) -> tuple[np.ndarray, int]:
    """WAV / FLAC / OGG bytes → (float32 ``[frames, channels]``, sample rate)."""
    if not data:
        raise AudioError("audio file is empty (0 bytes)")
    if sniff_format(data) == "wav":
        check_wav_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sample_rate, channels, frames = f.samplerate, f.channels, f.frames
            check_sample_rate(sample_rate)
            check_channels(channels)
            if frames > MAX_SAMPLE_RATE * 3600 * 4:
                raise AudioError(f"audio file declares {frames} frames, more than 4 hours")
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise AudioError(f"cannot decode audio file: {_describe(exc)}") from None
    if samples.shape[0] == 0:
        raise AudioError("audio file contains no samples")
    return check_samples(samples), sample_rate


def first_channel(x: np.ndarray) -> np.ndarray:
    """Mono by taking channel 0 (what the reference tokenizer does)."""
    arr = np.asarray(x, dtype=np.float32)
    return arr if arr.ndim == 1 else np.ascontiguousarray(arr[:, 0])


def mixdown(x: np.ndarray) -> np.ndarray:
    """Mono by averaging all channels."""
    arr = np.asarray(x, dtype=np.float32)
    return arr if arr.ndim == 1 else arr.mean(axis=1, dtype=np.float32)


def to_mono(x: np.ndarray, channel: str | int = "first") -> np.ndarray:
    if channel == "first":
        return first_channel(x)
    if channel == "mix":
        return mixdown(x)
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        if channel != 0:
            raise AudioError(f"channel {channel} requested from mono audio")
        return arr
    if not 0 <= int(channel) < arr.shape[1]:
        raise AudioError(f"channel {channel} requested from {arr.shape[1]}-channel audio")
    return np.ascontiguousarray(arr[:, int(channel)])


def resample(x: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ") -> np.ndarray:
    """Resample mono or ``[frames, channels]`` audio with soxr (one-shot)."""
    check_sample_rate(sr_in)
    check_sample_rate(sr_out)
    arr = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out or arr.shape[0] == 0:
        return arr
    return soxr.resample(arr, sr_in, sr_out, quality=quality).astype(np.float32, copy=False)


class StreamResampler:
    """Chunked resampling whose concatenated output equals resampling the whole signal at once."""

    def __init__(self, sr_in: int, sr_out: int, quality: str = "HQ") -> None:
        self.sr_in, self.sr_out = check_sample_rate(sr_in), check_sample_rate(sr_out)
        self._stream = None if sr_in == sr_out else soxr.ResampleStream(sr_in, sr_out, 1, "float32", quality)

    def push(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if self._stream is None:
            return arr
        return self._stream.resample_chunk(arr, last=last)


# --- encoding ----------------------------------------------------------------------------------


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def encode_pcm(x: np.ndarray, encoding: Encoding | str | int) -> bytes:
    """float32 samples (mono or interleaved ``[frames, channels]``) → raw bytes."""
    enc = Encoding.parse(encoding)
    arr = check_samples(x, allow_empty=True)
    if enc is Encoding.FLOAT32:
        return np.clip(arr, -1.0, 1.0).astype("<f4").tobytes()
    pcm = _to_pcm16(arr).reshape(-1)
    if enc is Encoding.PCM16:
        return pcm.astype("<i2").tobytes()
    if enc is Encoding.MULAW:
        return _mulaw_encode(pcm).tobytes()
    return _alaw_encode(pcm).tobytes()


def encode_wav(x: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    arr = check_samples(x, allow_empty=True)
    buf = io.BytesIO()
    sf.write(buf, arr, check_sample_rate(sample_rate), format="WAV", subtype=subtype)
    return buf.getvalue()


# --- protobuf AudioChunk -----------------------------------------------------------------------


def from_audio_chunk(chunk: object, *, channel: str | int = "first") -> tuple[np.ndarray, int]:
    """``glmvoice.v1.AudioChunk`` → (mono float32, sample rate)."""
    encoding = getattr(chunk, "encoding", 0)
    if not encoding:
        raise AudioError("audio encoding is unspecified; set PCM16, FLOAT32, MULAW or ALAW")
    sample_rate = check_sample_rate(int(getattr(chunk, "sample_rate", 0)))
    channels = int(getattr(chunk, "channels", 0)) or 1
    samples = decode_pcm(bytes(getattr(chunk, "data", b"")), int(encoding), channels)
    return to_mono(samples, channel), sample_rate


def to_audio_chunk(
    x: np.ndarray, sample_rate: int, encoding: Encoding | str | int = Encoding.PCM16
) -> object:
    from glmvoice.v1 import common_pb2

    enc = Encoding.parse(encoding)
    return common_pb2.AudioChunk(
        data=encode_pcm(x, enc), encoding=int(enc), sample_rate=check_sample_rate(sample_rate), channels=1
    )
