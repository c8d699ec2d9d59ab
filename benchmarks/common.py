"""Helpers shared by the end-to-end benchmarks (bench_turn, bench_schedule, bench_concurrency).

* profiles and checkpoints: ``prepare_models`` writes random checkpoints in the published layouts
  (``dev``: tiny; ``realsize``: tokenizer and decoder at the published dimensions, the LM at devmodel
  size ``mid``) or takes real directories, and optionally biases a *generated* LM towards audio tokens;
* the same spoken turn three ways, all returning a :class:`TurnTiming`:
  :class:`InProcess` (the model objects called directly, no gRPC / Redis / HTTP),
  :class:`GrpcDirect` (the three services over gRPC, no gateway) and :func:`stack_turn` (the gateway's
  HTTP streaming API: the full stack);
* statistics and markdown tables.

Random dev LMs emit mostly text (audio ids are ~10 % of the vocabulary). ``bias_lm_towards_audio``
rewrites a generated checkpoint so the LM emits audio at about the real model's rate (about two of
three tokens) without changing any shape, hence without changing the cost of a forward pass: residual
dimension 0 is made a constant (embedding column 0 = C, the attention and MLP output rows 0 = 0) and
the audio rows of the output layer read that dimension with weight B. Both sides of every comparison
use the same checkpoint and the same seeds, so they consume the same token sequence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "question.wav"
OURS = (10, 25, 50, 100, 150, 200)
REFERENCE = (25, 50, 100, 150, 200)
REDIS_DB = 10  # benchmarks use Redis databases 10-12 (tests use 3-8 and 15)


# --- statistics and output ------------------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no data."""
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return float("nan")
    k = min(len(vals) - 1, max(0, round(q / 100 * len(vals) + 0.5) - 1))
    return vals[k]


def med(xs: Sequence[float]) -> float:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else float("nan")


def fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, float):
        return "-" if x != x else f"{x:.{digits}f}"
    return str(x)


def table(title: str, header: list[str], rows: list[list[Any]], digits: int = 1) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c, digits) for c in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine_info(device: str = "cpu") -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if device.startswith("cuda"):
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{dt.date.today().isoformat()}, {os.cpu_count()} cores, {cpu}{gpu}, load avg at start {load:.1f}, "
        f"python {platform.python_version()}"
    )


def add_profile_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", choices=["dev", "realsize"], default="dev",
                    help="dev: tiny random checkpoints; realsize: tokenizer/decoder published size, LM 'mid'")
    ap.add_argument("--device", default="cpu", help="torch device of every model (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    ap.add_argument("--tokenizer-model", type=Path, default=None, help="real tokenizer checkpoint directory")
    ap.add_argument("--lm-model", type=Path, default=None, help="real LM checkpoint directory")
    ap.add_argument("--decoder-model", type=Path, default=None, help="real decoder checkpoint directory")
    ap.add_argument("--models-root", type=Path, default=REPO / ".models" / "bench",
                    help="where generated checkpoints are written (kept between runs)")
    ap.add_argument("--audio-bias", type=float, default=2.0,
                    help="bias of a generated LM towards audio tokens (0 = as written by make-dev)")
    ap.add_argument("--redis-db", type=int, default=REDIS_DB)
    ap.add_argument("--service-threads", type=int, default=0,
                    help="torch/OpenMP threads per service process and in-process (0 = as shipped: torch's "
                    "default, one per core in every process)")


# --- checkpoints ----------------------------------------------------------------------------------


def load_engine_lm(model_dir: Path, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """An LM checkpoint for engine benchmarks: (loaded model, text tokenizer, a TokenSpec with no stop
    ids, so every stream runs to its token limit)."""
    from glmv_lm.checkpoint import load_model
    from glmv_lm.engine import TokenSpec
    from glmv_lm.text_tokenizer import GlmTextTokenizer

    loaded = load_model(model_dir, device=device, dtype=dtype)
    tok = GlmTextTokenizer.from_dir(model_dir)
    limit = min(loaded.vocab_size, tok.vocab_size, tok.audio_offset + tok.audio_count)
    spec = TokenSpec(limit, tok.audio_offset, tok.audio_count, end_token_id=-1, eos_ids=frozenset())
    return loaded, tok, spec


def engine_lm_from_args(args: argparse.Namespace, tmp: Path, seed: int = 0) -> tuple[Any, Any, Any, str]:
    """``--lm-model`` if given, else a random LM of devmodel size ``--size`` written under ``tmp``;
    also applies ``--service-threads`` and returns a label naming the model and its size."""
    import torch

    from glmv_lm.devmodel import write_dev_checkpoint

    if args.service_threads:
        torch.set_num_threads(args.service_threads)
    model_dir = args.lm_model or write_dev_checkpoint(tmp / args.size, seed=seed, size=args.size)
    loaded, tok, spec = load_engine_lm(model_dir, args.device, args.dtype)
    return loaded, tok, spec, f"{Path(model_dir).name} ({loaded.num_parameters / 1e6:.0f} M)"

SIZES = {"dev": {"tokenizer": "dev", "lm": "dev", "decoder": "dev"},
         "realsize": {"tokenizer": "realsize", "lm": "mid", "decoder": "realsize"}}


def _script(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def prepare_models(args: argparse.Namespace) -> dict[str, Path]:
    """Checkpoint directory per component: the given real ones, else generated (once) for the profile."""
    if args.service_threads:
        import torch

        torch.set_num_threads(args.service_threads)
    given = {"tokenizer": args.tokenizer_model, "lm": args.lm_model, "decoder": args.decoder_model}
    sizes = SIZES[args.profile]
    codebook = 64 if args.profile == "dev" else 16384
    root = args.models_root / f"{args.profile}-bias{args.audio_bias:g}"
    out: dict[str, Path] = {}
    for comp in ("tokenizer", "lm", "decoder"):
        if given[comp] is not None:
            out[comp] = Path(given[comp])
            continue
        path = root / comp
        marker = {"tokenizer": "model.safetensors", "lm": "config.json", "decoder": "flow.pt"}[comp]
        if not (path / marker).exists():
            cmd = [_script(f"glmv-{comp}"), "make-dev", "--out", str(path), "--seed", "0",
                   "--size", sizes[comp], "--codebook-size", str(codebook)]
            subprocess.run(cmd, check=True, capture_output=True)
            if comp == "lm" and args.audio_bias:
                bias_lm_towards_audio(path, args.audio_bias)
        out[comp] = path
    return out


def bias_lm_towards_audio(lm_dir: Path, strength: float) -> None:
    """Rewrite a generated ChatGLM-layout checkpoint so it emits audio tokens often (see module doc)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((lm_dir / "config.json").read_text())
    tok_cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    names = {v["content"]: int(k) for k, v in tok_cfg.get("added_tokens_decoder", {}).items()}
    audio_ids = [i for n, i in names.items() if n.startswith("<|audio_")]
    if not audio_ids:
        raise RuntimeError(f"no <|audio_N|> tokens in {lm_dir}/tokenizer_config.json")
    h = cfg["hidden_size"]
    for shard in sorted(lm_dir.glob("model-*-of-*.safetensors")):
        sd = load_file(str(shard))
        for key, t in sd.items():
            if key.endswith("word_embeddings.weight"):
                t[:, 0] = 3.0 * t[:, 1:].abs().mean() * h**0.5 / 8
            elif key.endswith("self_attention.dense.weight") or key.endswith("mlp.dense_4h_to_h.weight"):
                t[0, :] = 0
            elif key.endswith("output_layer.weight"):
                t[:, 0] = 0
                t[audio_ids, 0] = strength
        save_file(sd, str(shard), metadata={"format": "pt"})


def question_audio() -> tuple[np.ndarray, int, bytes]:
    from glmv_common import audio as audio_io

    data = SAMPLE.read_bytes()
    samples, rate = audio_io.decode_file(data)
    return audio_io.first_channel(samples) if samples.ndim > 1 else samples, rate, data


# --- one turn -------------------------------------------------------------------------------------


@dataclass
class TurnSettings:
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50
    max_new_tokens: int = 160
    max_audio_tokens: int = 100
    schedule: tuple[int, ...] = OURS

    def session_body(self) -> dict[str, Any]:
        return {"seed": self.seed, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "max_new_tokens": self.max_new_tokens,
                "max_audio_tokens": self.max_audio_tokens, "decoder_seed": 42,
                "chunk_schedule": list(self.schedule), "mode": "audio"}


@dataclass
class TurnTiming:
    ttft_ms: float | None = None  # first text delta
    ttfa_ms: float | None = None  # first audio chunk
    total_ms: float = 0.0
    audio_s: float = 0.0
    text_tokens: int = 0
    audio_tokens: int = 0
    completion_tokens: int = 0
    lm_tps: float | None = None  # decode tokens/s reported by the LM
    stages: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def rtf(self) -> float | None:
        return self.total_ms / 1000 / self.audio_s if self.audio_s else None


def chunk_sizes(schedule: Sequence[int]):  # type: ignore[no-untyped-def]
    yield from schedule
    while True:
        yield schedule[-1]


class InProcess:
    """The models loaded in this process and called directly; the LM engine in its own thread and the
    decoder in a worker thread, as in the services (the LM keeps generating while a chunk decodes)."""

    def __init__(self, models: dict[str, Path], device: str = "cpu", dtype: str = "float32",
                 max_batch_size: int = 16) -> None:
        from glmv_decoder.checkpoint import load_decoder
        from glmv_lm.checkpoint import load_model
        from glmv_lm.engine import EngineConfig, GenerationEngine
        from glmv_lm.service import token_spec
        from glmv_lm.text_tokenizer import GlmTextTokenizer
        from glmv_tokenizer.tokenizer import SpeechTokenizer

        self.tokenizer = SpeechTokenizer.from_dir(models["tokenizer"], device, dtype)
        self.loaded = load_model(models["lm"], device=device, dtype=dtype)
        self.text_tok = GlmTextTokenizer.from_dir(models["lm"])
        spec = token_spec(self.text_tok, self.loaded.vocab_size, self.loaded.eos_token_ids)
        self.engine = GenerationEngine(
            self.loaded.model, spec, self.text_tok.incremental_decoder,
            EngineConfig(max_batch_size=max_batch_size, max_context=self.loaded.max_context),
        )
        self.engine.start()
        self.decoder = load_decoder(models["decoder"], device, dtype)

    def close(self) -> None:
        self.engine.close()

    def turn(self, audio: np.ndarray, rate: int, s: TurnSettings) -> TurnTiming:
        from glmv_decoder.streaming import DecoderStream
        from glmv_lm.engine import DoneEvent
        from glmv_lm.sampling import SamplingParams
        from glmv_lm.template import render_prompt
        from glmvoice.v1 import lm_pb2

        t0 = time.perf_counter()
        ms = lambda: (time.perf_counter() - t0) * 1000  # noqa: E731
        r = TurnTiming()
        speech = self.tokenizer.tokenize(audio, rate)
        r.stages["tokenize_ms"] = ms()
        request = lm_pb2.GenerateRequest(
            mode=lm_pb2.INPUT_MODE_AUDIO,
            turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=speech))],
        )
        ids = render_prompt(request, self.text_tok, max_prompt_tokens=self.loaded.max_context - 512).ids
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                max_new_tokens=s.max_new_tokens, max_audio_tokens=s.max_audio_tokens)
        events: queue.Queue[Any] = queue.Queue()
        chunks: queue.Queue[tuple[list[int], bool] | None] = queue.Queue()
        stream = DecoderStream(self.decoder, seed=42)
        samples = [0]

        def decode() -> None:
            while (item := chunks.get()) is not None:
                toks, final = item
                out = stream.finish(toks) if final else stream.push(toks)
                if len(out):
                    if r.ttfa_ms is None:
                        r.ttfa_ms = ms()
                        first = stream.timings[-1]
                        r.stages["first_chunk_flow_ms"] = first.flow_ms
                        r.stages["first_chunk_hift_ms"] = first.hift_ms
                    samples[0] += len(out)

        worker = threading.Thread(target=decode, daemon=True)
        worker.start()
        self.engine.submit(ids, params, events.put)
        sizes = chunk_sizes(s.schedule)
        size, pending = next(sizes), []
        while True:
            ev = events.get()
            if isinstance(ev, DoneEvent):
                r.lm_tps = ev.decode_tokens_per_s
                r.stages["lm_ttft_ms"] = ev.time_to_first_token_ms
                r.stages["lm_prefill_ms"] = ev.prefill_ms
                r.completion_tokens = ev.completion_tokens
                break
            if ev.is_audio:
                r.audio_tokens += 1
                pending.append(ev.audio_token)
                if len(pending) >= size:
                    chunks.put((pending, False))
                    pending, size = [], next(sizes)
            else:
                r.text_tokens += 1
                if ev.text and r.ttft_ms is None:
                    r.ttft_ms = ms()
        if r.audio_tokens:
            chunks.put((pending, True))
        chunks.put(None)
        worker.join()
        r.total_ms = ms()
        r.audio_s = samples[0] / 22050
        return r


class GrpcDirect:
    """The three services called over gRPC from this process (no gateway, no Redis, no HTTP)."""

    def __init__(self, addrs: dict[str, str]) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.addrs = addrs
        self.clients: Any = None

    def close(self) -> None:
        if self.clients is not None:
            self.loop.run_until_complete(self.clients.close())
        self.loop.close()

    def turn(self, audio: np.ndarray, rate: int, s: TurnSettings) -> TurnTiming:
        return self.loop.run_until_complete(self._turn(audio, rate, s))

    async def _turn(self, audio: np.ndarray, rate: int, s: TurnSettings) -> TurnTiming:
        import asyncio

        from glmv_common import audio as audio_io
        from glmv_gateway.clients import ServiceClients
        from glmvoice.v1 import decoder_pb2, lm_pb2

        if self.clients is None:
            self.clients = ServiceClients(self.addrs["tokenizer"], self.addrs["lm"], self.addrs["decoder"])
        c = self.clients
        t0 = time.perf_counter()
        ms = lambda: (time.perf_counter() - t0) * 1000  # noqa: E731
        r = TurnTiming()
        rid = uuid.uuid4().hex
        chunk = audio_io.to_audio_chunk(audio, rate, audio_io.Encoding.PCM16)
        reply = await c.tokenize(chunk, request_id=rid, session_id="bench", timeout=60)
        r.stages["tokenize_ms"] = ms()
        request = lm_pb2.GenerateRequest(
            mode=lm_pb2.INPUT_MODE_AUDIO,
            turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=reply.tokens))],
            sampling=lm_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                           seed=s.seed, max_new_tokens=s.max_new_tokens,
                                           max_audio_tokens=s.max_audio_tokens),
            request_id=rid, session_id="bench",
        )
        start = decoder_pb2.SynthesizeStart(sample_rate=22050, encoding=1, seed=42, request_id=rid)
        dec = c.synthesize(start, timeout=600)
        samples = [0]

        async def read() -> None:
            async for resp in dec.responses():
                if resp.audio.data:
                    if r.ttfa_ms is None:
                        r.ttfa_ms = ms()
                        for t in resp.timings:
                            r.stages[f"first_chunk_{t.stage}_ms"] = t.ms
                    samples[0] += len(resp.audio.data) // 2

        reader = asyncio.create_task(read())
        sizes = chunk_sizes(s.schedule)
        size, pending = next(sizes), []
        async for msg in c.generate(request, timeout=600):
            if msg.HasField("done"):
                d = msg.done
                r.lm_tps, r.completion_tokens = d.decode_tokens_per_s, d.completion_tokens
                r.stages["lm_ttft_ms"] = d.time_to_first_token_ms
                for t in d.timings:
                    r.stages[f"{t.stage}_ms"] = t.ms
                break
            if msg.delta.kind == lm_pb2.DELTA_KIND_AUDIO:
                r.audio_tokens += 1
                pending.append(msg.delta.audio_token)
                if len(pending) >= size:
                    await dec.send_tokens(pending)
                    pending, size = [], next(sizes)
            else:
                r.text_tokens += 1
                if msg.delta.text and r.ttft_ms is None:
                    r.ttft_ms = ms()
        if pending:
            await dec.send_tokens(pending)
        await dec.finish()
        await reader
        r.total_ms = ms()
        r.audio_s = samples[0] / 22050
        return r


def stack_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"GLMV_GATEWAY_MAX_TURNS_PER_KEY": "256", "GLMV_LM_MAX_QUEUE": "256"}
    for comp in ("TOKENIZER", "LM", "DECODER"):
        env[f"GLMV_{comp}_DEVICE"] = args.device
        env[f"GLMV_{comp}_DTYPE"] = args.dtype
        env[f"GLMV_{comp}_LOG_LEVEL"] = "WARNING"
    env["GLMV_GATEWAY_LOG_LEVEL"] = "WARNING"
    if args.service_threads:
        env.update(threads_env(args.service_threads))
    return env


def threads_env(n: int) -> dict[str, str]:
    """n intra-op threads per model service; 0 = torch's default (one per core in every process)."""
    env = {f"GLMV_{c}_TORCH_THREADS": str(n) for c in ("TOKENIZER", "LM", "DECODER")}
    if n:
        env.update({"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)})
    return env


def start_stack(models: dict[str, Path], args: argparse.Namespace, db: int | None = None,
                extra: dict[str, str] | None = None) -> Any:
    from glmv_gateway.stack import LocalStack

    db = args.redis_db if db is None else db
    env = {**stack_env(args), **(extra or {})}
    stack = LocalStack(models=models, redis_url=f"redis://127.0.0.1:6379/{db}", extra_env=env,
                       with_worker=False, log_dir=REPO / ".run" / "bench-logs")
    return stack.start(timeout=600)


def stack_turn(client: Any, audio_bytes: bytes, s: TurnSettings, session_id: str | None = None) -> TurnTiming:
    """One spoken turn through the gateway's HTTP streaming API, timed at the client.

    A fresh session per call (same prompt every time) unless ``session_id`` is given."""
    sid = session_id or client.create_session(**s.session_body())["id"]
    r = TurnTiming()
    t0 = time.perf_counter()
    samples = 0
    try:
        for ev in client.stream_turn(sid, audio=audio_bytes, content_type="audio/wav"):
            kind = ev["type"]
            if kind == "text.delta" and r.ttft_ms is None:
                r.ttft_ms = (time.perf_counter() - t0) * 1000
            elif kind == "audio.delta":
                if r.ttfa_ms is None:
                    r.ttfa_ms = (time.perf_counter() - t0) * 1000
                samples += len(ev["samples"])
            elif kind == "error":
                r.error = f"{ev.get('component')}: {ev.get('code')}"
            elif kind == "turn.done":
                u, t = ev["usage"], ev["timings"]
                r.text_tokens, r.audio_tokens = u["text_tokens"], u["audio_tokens"]
                r.completion_tokens, r.lm_tps = u["completion_tokens"], u["lm_tokens_per_s"]
                r.stages = {"tokenize_ms": t["tokenize_ms"], "lm_ttft_ms": u["lm_time_to_first_token_ms"],
                            "gw_ttfa_ms": t["time_to_first_audio_ms"], "gw_total_ms": t["total_ms"]}
    except Exception as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:200]
    r.total_ms = (time.perf_counter() - t0) * 1000
    r.audio_s = samples / 22050
    return r
