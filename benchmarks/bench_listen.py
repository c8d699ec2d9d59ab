"""Listen RPC: Silero VAD cost per window, and concurrent VAD-cut streams over a real gRPC channel.

    .venv/bin/python benchmarks/bench_listen.py                     # dev tokenizer weights
    .venv/bin/python benchmarks/bench_listen.py --model DIR         # any tokenizer checkpoint

Part 1 scores ``samples/question.wav`` window by window (one stream, the service's worker thread
path) and reports the model time per 32 ms window. Part 2 runs 1, 4 and 16 concurrent Listen
streams, each sending the sample's two phrases with 1 s pauses in 20 ms chunks as fast as possible
(VAD on, defaults), and reports how much faster than real time each stream is processed and the
``finish_ms`` (tokenizer time after the end-of-speech decision) of the utterances.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
import torch

from glmv_common.audio import Encoding, encode_pcm
from glmv_common.runtime import start_service
from glmv_tokenizer.checkpoint import write_dev_checkpoint
from glmv_tokenizer.service import TokenizerService, TokenizerSettings
from glmv_tokenizer.vad import CONTEXT, WINDOW, SileroModel
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "question.wav"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def window_cost(audio: np.ndarray, repeats: int) -> dict[str, float]:
    model = SileroModel.shared()
    n = len(audio) // WINDOW
    windows = audio[: n * WINDOW].reshape(n, WINDOW)
    model.run_windows(windows, torch.zeros(2, 1, 128), np.zeros(CONTEXT, np.float32))  # warm-up
    per_window: list[float] = []
    for _ in range(repeats):
        state, context = torch.zeros(2, 1, 128), np.zeros(CONTEXT, np.float32)
        for w in windows:
            started = time.perf_counter()
            _, state, context = model.run_windows(w[None, :], state, context)
            per_window.append((time.perf_counter() - started) * 1e6)
    return {"windows": len(per_window), "mean_us": statistics.fmean(per_window),
            "p50_us": pct(per_window, 50), "p95_us": pct(per_window, 95)}  # fmt: skip


def stream_audio() -> np.ndarray:
    x, _ = sf.read(SAMPLE, dtype="float32")
    quiet = np.zeros(16000, np.float32)
    return np.concatenate([quiet[:8000], x[:12000], quiet, x[12000:], quiet])


async def run_streams(model_dir: Path, clients: int, audio: np.ndarray) -> dict[str, float]:
    settings = TokenizerSettings(model_dir=model_dir, port=0, max_concurrent_streams=256)
    service = TokenizerService(settings)
    running = await start_service(service, settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
    data = encode_pcm(audio, Encoding.PCM16)
    chunks = [
        tokenizer_pb2.ListenRequest(
            audio=common_pb2.AudioChunk(data=data[i : i + 640], encoding=1, sample_rate=16000, channels=1)
        )
        for i in range(0, len(data), 640)
    ]
    vad = tokenizer_pb2.VadConfig(enabled=True)
    cfg = tokenizer_pb2.ListenRequest(config=tokenizer_pb2.ListenConfig(vad=vad))
    finish: list[float] = []
    speed: list[float] = []
    utterances: list[int] = []

    async def one() -> None:
        async def requests():
            yield cfg
            for c in chunks:
                yield c

        started = time.perf_counter()
        done = [e.done async for e in stub.Listen(requests()) if e.WhichOneof("msg") == "done"]
        speed.append(len(audio) / 16000 / (time.perf_counter() - started))
        finish.extend(d.finish_ms for d in done)
        utterances.append(len(done))

    await one()  # warm-up
    finish.clear(), speed.clear(), utterances.clear()
    await asyncio.gather(*(one() for _ in range(clients)))
    await channel.close()
    await running.stop(grace=0)
    return {"clients": clients, "x_realtime_p50": pct(speed, 50), "x_realtime_min": min(speed),
            "finish_ms_p50": pct(finish, 50), "finish_ms_p95": pct(finish, 95),
            "utterances_per_stream": statistics.fmean(utterances)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="tokenizer checkpoint (default: a dev one)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    x, _ = sf.read(SAMPLE, dtype="float32")
    cost = window_cost(x, args.repeats)
    print(f"VAD per 32 ms window: mean {cost['mean_us']:.0f} us, p50 {cost['p50_us']:.0f} us, "
          f"p95 {cost['p95_us']:.0f} us over {cost['windows']} windows "
          f"(torch threads {torch.get_num_threads()})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_dev_checkpoint(Path(tmp) / "dev", seed=0)
        audio = stream_audio()
        print("| streams | x real time p50 | x real time min | finish_ms p50 | finish_ms p95 | utterances |")
        print("|---|---|---|---|---|---|")
        for clients in (1, 4, 16):
            r = await run_streams(model_dir, clients, audio)
            cells = [r["x_realtime_p50"], r["x_realtime_min"], r["finish_ms_p50"], r["finish_ms_p95"]]
            print(f"| {clients} | " + " | ".join(f"{c:.1f}" for c in cells)
                  + f" | {r['utterances_per_stream']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
