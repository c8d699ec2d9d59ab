"""The contracts: stubs generated from protos/ import, and each service answers GetInfo over a channel."""

from __future__ import annotations

import grpc
import pytest

from glmv_common.runtime import start_service
from glmv_common.settings import ServiceSettings
from glmvoice.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
    tokenizer_pb2_grpc,
)

SERVICES = [
    ("tokenizer", "glmvoice.v1.SpeechTokenizer", tokenizer_pb2_grpc, "SpeechTokenizer"),
    ("lm", "glmvoice.v1.LanguageModel", lm_pb2_grpc, "LanguageModel"),
    ("decoder", "glmvoice.v1.SpeechDecoder", decoder_pb2_grpc, "SpeechDecoder"),
]


def test_contract_shapes() -> None:
    # the oneofs the gateway depends on
    assert lm_pb2.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"].fields[0].name == "delta"
    assert [f.name for f in decoder_pb2.SynthesizeRequest.DESCRIPTOR.oneofs_by_name["msg"].fields] == [
        "start",
        "tokens",
        "finish",
    ]
    assert common_pb2.AudioEncoding.Value("AUDIO_ENCODING_MULAW") == 3
    assert lm_pb2.EndReason.Name(1) == "END_REASON_END_TOKEN"


@pytest.mark.parametrize(("component", "full_name", "module", "name"), SERVICES)
async def test_minimal_servicer_answers_get_info(component, full_name, module, name) -> None:
    base = getattr(module, f"{name}Servicer")
    add = getattr(module, f"add_{name}Servicer_to_server")

    class Minimal(base):
        service_name = full_name

        def __init__(self) -> None:
            self.component = component

        def add_to_server(self, server: grpc.aio.Server) -> None:
            add(self, server)

        def load(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

        async def GetInfo(self, request, context):
            return common_pb2.ModelInfo(component=component, codebook_size=64, token_rate_hz=12.5)

    running = await start_service(Minimal(), ServiceSettings(host="127.0.0.1", port=0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = getattr(module, f"{name}Stub")(channel)
            info = await stub.GetInfo(common_pb2.GetInfoRequest())
            assert (info.component, info.codebook_size, info.token_rate_hz) == (component, 64, 12.5)
    finally:
        await running.stop(grace=0)
