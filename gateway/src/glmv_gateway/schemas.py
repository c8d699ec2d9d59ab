"""Request and response bodies of the public API (also the session settings stored in Redis)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

OUTPUT_RATES = (8000, 16000, 22050, 24000, 48000)
MAX_TEXT_CHARS = 20_000  # a text turn, over every transport
OutputRate = Literal[8000, 16000, 22050, 24000, 48000]
ChunkSize = Annotated[int, Field(ge=1, le=1000)]


class Strict(BaseModel):
    """Unknown fields are refused, and so are booleans and strings where a number belongs
    (``"seed": true`` is not 1, ``"top_k": "5"`` is not 5); an integral float such as ``5.0`` is
    still the integer 5, as JSON Schema counts it."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _json_numbers(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kinds = str(field.annotation)
            if name not in data or not any(k in kinds for k in ("int", "float")) or "Literal" in kinds:
                continue
            values = data[name] if isinstance(data[name], list) else [data[name]]
            if any(isinstance(v, bool | str) for v in values):
                raise ValueError(f"{name} must be a JSON number, not a boolean or a string")
        return data


class Style(Strict):
    """Style instructions the LM renders as text the way the model was trained to read them."""

    emotion: str | None = Field(None, max_length=64, examples=["happy"])
    speed: str | None = Field(None, max_length=64, examples=["slow"])
    dialect: str | None = Field(None, max_length=64, examples=["Cantonese"])
    language: str | None = Field(None, max_length=64, examples=["English"])
    free_text: str | None = Field(None, max_length=500)


class OutputAudio(Strict):
    sample_rate: OutputRate = Field(22050, description="8000, 16000, 22050 (native), 24000 or 48000 Hz")
    encoding: Literal["pcm16", "float32", "mulaw", "alaw"] = "pcm16"


class TurnDetection(Strict):
    """Who decides that the user has finished speaking.

    ``none``: the client commits each utterance. ``server_vad``: the tokenizer's voice activity
    detector (Silero VAD) cuts the incoming audio into utterances; each one starts a reply if
    ``create_response``, and speech during a reply interrupts it if ``interrupt_response``.
    """

    type: Literal["none", "server_vad"] = "none"
    threshold: float = Field(0.5, gt=0, lt=1, description="speech probability threshold")
    prefix_padding_ms: int = Field(300, ge=0, le=5000, description="audio kept before the detected start")
    silence_duration_ms: int = Field(500, ge=100, le=10_000, description="silence that ends an utterance")
    create_response: StrictBool = True
    interrupt_response: StrictBool = True


class SessionSettings(Strict):
    """Per-session defaults; every field is optional when creating or patching a session."""

    mode: Literal["audio", "text"] | None = Field(
        None, description="System prompt: speech or text instruction. Default: the first turn's input kind."
    )
    style: Style = Field(default_factory=Style)
    temperature: float = Field(0.2, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(50, ge=0, le=100_000)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    max_new_tokens: int = Field(2000, ge=1, le=8192)
    max_audio_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, description="LM sampling seed (reproducible replies)")
    decoder_seed: int | None = Field(None, ge=0, description="Flow-matching noise seed (default 42)")
    output: OutputAudio = Field(default_factory=OutputAudio)
    chunk_schedule: list[ChunkSize] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Audio tokens per decoder chunk (1..1000 each); the last size repeats",
    )
    turn_detection: TurnDetection = Field(default_factory=TurnDetection)


class SessionCreate(SessionSettings):
    """A new session's settings, and optionally the component versions to pin it to."""

    versions: dict[Literal["tokenizer", "decoder"], str] | None = Field(
        None,
        description="Pin the session to these versions (ids of GET /v1/models); the others are chosen "
        "by weight. The session keeps its versions for its whole life.",
        examples=[{"decoder": "v2"}],
    )


class SessionPatch(Strict):
    """Fields to change; nested objects replace the stored ones; ``null`` resets a field to its
    default."""

    mode: Literal["audio", "text"] | None = None
    style: Style | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    max_audio_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0)
    decoder_seed: int | None = Field(None, ge=0)
    output: OutputAudio | None = None
    chunk_schedule: list[ChunkSize] | None = Field(None, min_length=1, max_length=32)
    turn_detection: TurnDetection | None = None


class TextTurn(Strict):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT_CHARS)


def apply_patch(current: dict[str, object], changes: dict[str, object]) -> dict[str, object]:
    """The stored settings after a patch (nested objects replace the stored ones); raises
    pydantic's ValidationError on a bad patch."""
    patch = SessionPatch.model_validate(changes).model_dump(mode="json", exclude_unset=True)
    merged = {**current, **patch}
    for name, value in patch.items():
        if value is None:  # null resets the field to its default
            merged.pop(name)
    return SessionSettings.model_validate(merged).model_dump(mode="json")
