from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from glmv_common import audio
from glmv_common.audio import Encoding
from glmv_common.errors import AudioError

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


def tone(sr: int, seconds: float = 0.25, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize(
    ("encoding", "tolerance"),
    [(Encoding.PCM16, 1 / 32768), (Encoding.FLOAT32, 0.0), (Encoding.MULAW, 0.02), (Encoding.ALAW, 0.02)],
)
def test_raw_round_trip(sr: int, encoding: Encoding, tolerance: float) -> None:
    x = tone(sr)
    data = audio.encode_pcm(x, encoding)
    assert len(data) == len(x) * encoding.bytes_per_sample
    y = audio.decode_pcm(data, encoding)
    assert y.shape == (len(x), 1)
    assert np.abs(y[:, 0] - x).max() <= tolerance + 1e-7


def test_g711_matches_the_standard_tables() -> None:
    # Values every G.711 implementation agrees on (ITU-T G.711 tables).
    assert audio.decode_pcm(bytes([0xFF, 0x00, 0x80, 0x7F]), Encoding.MULAW)[:, 0].tolist() == [
        0.0,
        -32124 / 32768,
        32124 / 32768,
        0.0,
    ]
    assert audio.decode_pcm(bytes([0xD5, 0x55, 0xAA, 0x2A]), Encoding.ALAW)[:, 0].tolist() == [
        8 / 32768,
        -8 / 32768,
        32256 / 32768,
        -32256 / 32768,
    ]
    # encode(decode(code)) is the identity on every code that is not a second zero
    codes = bytes(range(256))
    for enc in (Encoding.MULAW, Encoding.ALAW):
        decoded = audio.decode_pcm(codes, enc)
        again = audio.encode_pcm(decoded, enc)
        redecoded = audio.decode_pcm(again, enc)
        assert np.array_equal(decoded, redecoded)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
@pytest.mark.parametrize("sr", [8000, 16000, 48000])
def test_file_round_trip(fmt: str, sr: int) -> None:
    x = tone(sr, channels=2)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    y, rate = audio.decode_file(buf.getvalue())
    assert rate == sr and y.shape == x.shape
    tolerance = 0.1 if fmt == "OGG" else 1e-3
    assert np.abs(y - x).max() < tolerance


def test_encode_wav_decodes_back() -> None:
    x = tone(22050)
    y, sr = audio.decode_file(audio.encode_wav(x, 22050))
    assert sr == 22050 and np.abs(y[:, 0] - x).max() <= 1 / 32768 + 1e-7


def test_channel_selection_and_mixdown() -> None:
    x = np.stack([np.full(10, 0.2), np.full(10, 0.6)], axis=1).astype(np.float32)
    assert np.allclose(audio.first_channel(x), 0.2)
    assert np.allclose(audio.mixdown(x), 0.4)
    assert np.allclose(audio.to_mono(x, 1), 0.6)
    with pytest.raises(AudioError, match="channel 2"):
        audio.to_mono(x, 2)
    interleaved = audio.encode_pcm(x, Encoding.PCM16)
    assert audio.decode_pcm(interleaved, Encoding.PCM16, channels=2).shape == (10, 2)


@pytest.mark.parametrize(("sr_in", "sr_out"), [(8000, 16000), (48000, 16000), (22050, 24000), (44100, 22050)])
def test_resample_keeps_duration_and_pitch(sr_in: int, sr_out: int) -> None:
    x = tone(sr_in, seconds=1.0, freq=300.0)
    y = audio.resample(x, sr_in, sr_out)
    assert abs(len(y) - sr_out) <= 1
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * sr_out / len(y)
    assert abs(peak_hz - 300.0) < 2.0


def test_stream_resampler_equals_one_shot() -> None:
    x = tone(22050, seconds=1.0)
    one_shot = audio.StreamResampler(22050, 16000).push(x, last=True)
    stream = audio.StreamResampler(22050, 16000)
    pieces = [stream.push(x[i : i + 3000], last=i + 3000 >= len(x)) for i in range(0, len(x), 3000)]
    chunked = np.concatenate(pieces)
    assert len(chunked) == len(one_shot)
    assert np.abs(chunked - one_shot).max() < 1e-5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: audio.decode_file(b""), "empty"),
        (lambda: audio.decode_file(b"RIFF\x00\x00\x00\x00WAVEjunk"), "cannot decode"),
        (lambda: audio.decode_pcm(b"\x00\x01\x02", Encoding.PCM16), "truncated"),
        (lambda: audio.decode_pcm(np.array([np.nan], "<f4").tobytes(), Encoding.FLOAT32), "NaN"),
        (lambda: audio.decode_pcm(b"\x00\x00", "opus"), "unknown audio encoding"),
        (lambda: audio.decode_pcm(b"\x00\x00", Encoding.PCM16, channels=0), "channel count"),
        (lambda: audio.resample(np.zeros(10), 4000, 16000), "out of range"),
        (lambda: audio.resample(np.zeros(10), 16000, 10**6), "out of range"),
        (lambda: audio.check_samples(np.zeros(0)), "empty"),
        (lambda: audio.check_samples(np.array([1.0, np.inf])), "infinite"),
    ],
)
def test_bad_input_raises_audio_error(call, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        call()


def test_truncated_wav_is_an_audio_error_or_shorter() -> None:
    wav = audio.encode_wav(tone(16000), 16000)
    for cut in (10, 44, 45, len(wav) // 2):
        try:
            y, _ = audio.decode_file(wav[:cut])
        except AudioError:
            continue
        assert len(y) < 4000


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_audio_error(data: bytes) -> None:
    for decode in (
        lambda: audio.decode_file(data),
        lambda: audio.decode_pcm(data, Encoding.PCM16),
        lambda: audio.decode_pcm(data, Encoding.FLOAT32, channels=2),
        lambda: audio.decode_pcm(data, Encoding.MULAW),
        lambda: audio.decode_pcm(data, Encoding.ALAW),
    ):
        try:
            out = decode()
        except AudioError:
            continue
        assert np.isfinite(out[0] if isinstance(out, tuple) else out).all()


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(0, 300), elements=st.floats(allow_nan=True, allow_infinity=True)),
    st.sampled_from(list(Encoding)),
    st.integers(-10, 400_000),
)
def test_arbitrary_arrays_only_raise_audio_error(x: np.ndarray, encoding: Encoding, rate: int) -> None:
    try:
        data = audio.encode_pcm(x, encoding)
        audio.decode_pcm(data, encoding)
        audio.resample(x, rate, 16000)
        audio.encode_wav(x, rate)
    except AudioError:
        return


def test_wav_cut_mid_data_is_refused_naming_the_cut() -> None:
    wav = audio.encode_wav(tone(16000), 16000)
    with pytest.raises(AudioError, match="truncated: its data chunk declares 8000 bytes but only"):
        audio.decode_file(wav[: len(wav) // 2])
    with pytest.raises(AudioError, match="no data chunk"):
        audio.decode_file(wav[:40])


def test_streamed_wav_with_unknown_length_still_decodes() -> None:
    wav = bytearray(audio.encode_wav(tone(16000, 0.1), 16000))
    wav[40:44] = b"\xff\xff\xff\xff"  # a live recorder that never rewrote the data size
    y, rate = audio.decode_file(bytes(wav))
    assert rate == 16000 and len(y) == 1600


def test_sniff_format() -> None:
    wav = audio.encode_wav(tone(16000, 0.1), 16000)
    buf = io.BytesIO()
    sf.write(buf, tone(16000, 0.1), 16000, format="FLAC")
    assert audio.sniff_format(wav) == "wav"
    assert audio.sniff_format(buf.getvalue()) == "flac"
    assert audio.sniff_format(b"\x00") is None


@pytest.mark.parametrize(
    "data", [b"RIFF\x24\x00\x00\x00WAVEfmt garbage", b"fLaC" + b"\x00" * 50, b"OggS" * 3]
)
def test_decoder_messages_do_not_leak_object_reprs(data: bytes) -> None:
    with pytest.raises(AudioError) as err:
        audio.decode_file(data)
    assert "BytesIO" not in str(err.value) and " at 0x" not in str(err.value), str(err.value)
