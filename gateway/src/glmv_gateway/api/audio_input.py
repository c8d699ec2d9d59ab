"""Turn request bodies into mono float32 audio: files by content type, raw PCM by its parameters.

Accepted content types:
* ``audio/wav`` (``audio/x-wav``, ``audio/wave``), ``audio/flac``, ``audio/ogg``: decoded by soundfile;
* ``audio/pcm;rate=16000;encoding=pcm16|float32|mulaw|alaw;channels=1``: raw little-endian samples;
* ``audio/basic``: 8 kHz G.711 mu-law; ``audio/pcmu`` / ``audio/pcma`` (``;rate=``, default 8000).
Multi-channel audio keeps the first channel, as the reference tokenizer does.
"""

from __future__ import annotations

import numpy as np
from fastapi import Request, UploadFile

from glmv_common import audio as audio_io
from glmv_common.errors import AudioError
from glmv_gateway.api.errors import ApiError

FILE_TYPES = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/ogg": "ogg",
}

# The speech tokenizer emits one token per 80 ms (12.5 Hz): shorter input cannot make a single token.
MIN_AUDIO_SECONDS = 0.08


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    media, *params = [p.strip() for p in value.split(";")]
    parsed = {}
    for param in params:
        name, _, val = param.partition("=")
        if name:
            parsed[name.strip().lower()] = val.strip().strip('"')
    return media.lower(), parsed


def decode_body(data: bytes, content_type: str) -> tuple[np.ndarray, int]:
    """Return (mono float32 samples, sample rate) or raise ApiError 400/415."""
    media, params = parse_content_type(content_type)
    if not data:
        raise ApiError(400, "audio body is empty")
    try:
        if media in FILE_TYPES:
            found = audio_io.sniff_format(data)
            if found is None:
                raise ApiError(
                    400, f"bad audio: the body is labelled {media} but is not a WAV, FLAC or Ogg file"
                )
            if found != FILE_TYPES[media]:
                raise ApiError(
                    415,
                    f"the body is labelled {media} but holds a {found.upper()} file: "
                    f"send it as audio/{'wav' if found == 'wav' else found}",
                )
            samples, rate = audio_io.decode_file(data)
        elif media in ("audio/pcm", "audio/raw", "audio/basic", "audio/pcmu", "audio/pcma"):
            default_encoding = {"audio/basic": "mulaw", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}
            encoding = params.get("encoding", default_encoding.get(media, ""))
            if not encoding:
                raise ApiError(
                    400, "raw audio needs an encoding parameter, e.g. audio/pcm;rate=16000;encoding=pcm16"
                )
            rate_text = params.get("rate") or ("8000" if media in default_encoding else "")
            if not rate_text.isdigit():
                raise ApiError(400, f"raw audio needs a numeric rate parameter, got {rate_text!r}")
            rate = audio_io.check_sample_rate(int(rate_text))
            channels_text = params.get("channels", "1")
            if not channels_text.isdigit():
                raise ApiError(400, f"channels must be a number, got {channels_text!r}")
            samples = audio_io.decode_pcm(data, encoding, int(channels_text))
        else:
            raise ApiError(
                415,
                f"unsupported content type {media!r}: send audio/wav, audio/flac, audio/ogg, "
                "audio/pcm;rate=...;encoding=..., audio/basic, or application/json with text",
            )
        mono = audio_io.first_channel(samples)
        audio_io.check_samples(mono)
    except AudioError as exc:
        raise ApiError(400, f"bad audio: {exc}") from None
    seconds = len(mono) / rate
    if seconds < MIN_AUDIO_SECONDS:
        raise ApiError(
            400,
            f"bad audio: {seconds * 1000:.1f} ms is shorter than one speech token "
            f"({MIN_AUDIO_SECONDS * 1000:.0f} ms)",
        )
    return mono, rate


def check_declared_length(request: Request, limit: int) -> None:
    """413 before reading anything when Content-Length already says the body is too large."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}")


async def read_upload(upload: UploadFile, limit: int) -> tuple[np.ndarray, int]:
    """A multipart audio file part → (mono float32 samples, sample rate)."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"audio part exceeds the limit of {limit} bytes")
    return decode_body(data, upload.content_type or "audio/wav")
