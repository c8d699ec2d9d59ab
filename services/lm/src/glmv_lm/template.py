"""The GLM-4-Voice chat template, rendered straight to token ids from a structured conversation.

The reference (``web_demo.py``) builds, for the first turn,

    [gMASK]<sop><|system|>\\n{system prompt}<|user|>\\n{user input}<|assistant|>streaming_transcription\\n

and for each later turn appends the previous completion and another
``<|user|>\\n{user input}<|assistant|>streaming_transcription\\n``. We render the same sequence
piece by piece, which gives the same ids as tokenizing the whole string (the reference tokenizer
splits on added tokens first and BPE-encodes each piece separately), with three deliberate
differences:

* assistant turns are re-inserted from the ids the model generated (the reference round-trips them
  through text and re-tokenizes, which can change ids); trailing terminator ids (``<|user|>``,
  ``<|endoftext|>``, ``<|observation|>``) are dropped because the next ``<|user|>`` follows anyway;
* user text is encoded as plain text: a user typing ``<|assistant|>`` gets BPE tokens, not the role
  tag (the reference would inject it);
* optional style instructions become one line of plain text after the last user turn's content
  (see :func:`style_text`).

When the conversation does not fit ``max_prompt_tokens``, the oldest exchanges (a user turn with
the assistant reply that follows it) are dropped whole; the system prompt is always kept. If the
last user turn alone does not fit, the request is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from glmv_common.errors import InvalidRequest
from glmv_lm.text_tokenizer import ASSISTANT, BEGIN_OF_AUDIO, END_OF_AUDIO, SYSTEM, USER, GlmTextTokenizer

# Verbatim from the reference web demo (the audio one ends with a space, the text one does not).
SYSTEM_PROMPT_AUDIO = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
SYSTEM_PROMPT_TEXT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_OPENING = "streaming_transcription\n"
TERMINATORS = ("<|user|>", "<|endoftext|>", "<|observation|>")

Mode = Literal["audio", "text"]
Role = Literal["user", "assistant"]


@dataclass
class Turn:
    """One message: a user turn (``text`` or ``audio`` speech tokens) or an assistant turn
    (``generated`` LM ids; ``text`` is accepted as a fallback and BPE-encoded)."""

    role: Role
    text: str | None = None
    audio: Sequence[int] | None = None
    generated: Sequence[int] | None = None


@dataclass
class Style:
    emotion: str = ""
    speed: str = ""
    dialect: str = ""
    language: str = ""
    free_text: str = ""


@dataclass
class Conversation:
    """The structured prompt (the dataclass twin of ``lm_pb2.GenerateRequest``)."""

    turns: list[Turn]
    mode: Mode = "audio"
    style: Style | None = None


@dataclass
class RenderedPrompt:
    ids: list[int]
    dropped_turns: int  # Turn messages left out from the start (a dropped exchange counts its 2 turns)
    dropped_exchanges: int = 0
    kept_turns: int = 0
    turn_token_counts: list[int] = field(default_factory=list)  # per kept exchange

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def conversation_from_proto(req: Any) -> Conversation:
    """``lm_pb2.GenerateRequest`` → :class:`Conversation` (mode UNSPECIFIED reads as AUDIO)."""
    from glmvoice.v1 import lm_pb2

    mode: Mode = "text" if req.mode == lm_pb2.INPUT_MODE_TEXT else "audio"
    turns: list[Turn] = []
    for i, t in enumerate(req.turns):
        if t.role == lm_pb2.Turn.ROLE_USER:
            role: Role = "user"
        elif t.role == lm_pb2.Turn.ROLE_ASSISTANT:
            role = "assistant"
        else:
            raise InvalidRequest(f"turn {i}: role must be USER or ASSISTANT")
        kind = t.WhichOneof("content")
        if kind == "text":
            turns.append(Turn(role, text=t.text))
        elif kind == "audio":
            turns.append(Turn(role, audio=list(t.audio.tokens)))
        elif kind == "generated":
            turns.append(Turn(role, generated=list(t.generated.ids)))
        else:
            turns.append(Turn(role))
    style = None
    if req.HasField("style"):
        s = req.style
        style = Style(s.emotion, s.speed, s.dialect, s.language, s.free_text)
    return Conversation(turns=turns, mode=mode, style=style)


def style_text(style: Style | None) -> str:
    """Style instructions as one line of plain text ("" when there are none).

    Each non-empty field becomes a short English instruction, in this order:
    emotion → "Respond with a {emotion} emotion.", speed → "Speak at a {speed} speed.",
    dialect → "Speak in {dialect}.", language → "Respond in {language}.", free_text verbatim.
    """
    if style is None:
        return ""
    parts = []
    if style.emotion.strip():
        parts.append(f"Respond with a {style.emotion.strip()} emotion.")
    if style.speed.strip():
        parts.append(f"Speak at a {style.speed.strip()} speed.")
    if style.dialect.strip():
        parts.append(f"Speak in {style.dialect.strip()}.")
    if style.language.strip():
        parts.append(f"Respond in {style.language.strip()}.")
    if style.free_text.strip():
        parts.append(style.free_text.strip())
    return " ".join(parts)


def system_prompt(mode: Mode) -> str:
    return SYSTEM_PROMPT_TEXT if mode == "text" else SYSTEM_PROMPT_AUDIO


def _user_ids(turn: Turn, index: int, tok: GlmTextTokenizer, style: str) -> list[int]:
    ids = [tok.token_id(USER)]
    if turn.audio is not None and turn.text is None:
        tokens = list(turn.audio)
        if not tokens:
            raise InvalidRequest(f"turn {index}: empty speech-token list")
        bad = [k for k in tokens if not 0 <= k < tok.audio_count]
        if bad:
            top = tok.audio_count - 1
            raise InvalidRequest(
                f"turn {index}: speech token {bad[0]} outside the LM's audio vocabulary 0..{top}"
            )
        ids += tok.encode("\n", parse_special=False)
        ids.append(tok.token_id(BEGIN_OF_AUDIO))
        ids += [tok.audio_offset + k for k in tokens]
        ids.append(tok.token_id(END_OF_AUDIO))
        if style:
            ids += tok.encode("\n" + style, parse_special=False)
    elif turn.text is not None and turn.audio is None:
        if not turn.text:
            raise InvalidRequest(f"turn {index}: empty user text")
        body = "\n" + turn.text + ("\n" + style if style else "")
        ids += tok.encode(body, parse_special=False)
    else:
        raise InvalidRequest(f"turn {index}: a user turn needs exactly one of text or audio")
    ids.append(tok.token_id(ASSISTANT))
    ids += tok.encode(ASSISTANT_OPENING, parse_special=False)
    return ids


def _assistant_ids(turn: Turn, index: int, tok: GlmTextTokenizer) -> list[int]:
    if turn.generated is not None:
        ids = [int(i) for i in turn.generated]
        bad = [i for i in ids if not tok.is_valid(i)]
        if bad:
            raise InvalidRequest(f"turn {index}: generated id {bad[0]} is not a token of this LM")
    elif turn.text is not None:
        ids = tok.encode(turn.text, parse_special=False)
    else:
        raise InvalidRequest(f"turn {index}: an assistant turn needs generated ids (or text)")
    terminators = {tok.token_id(t) for t in TERMINATORS if tok.has_token(t)}
    while ids and ids[-1] in terminators:
        ids.pop()
    return ids


def render_prompt(
    request: Any, tok: GlmTextTokenizer, max_prompt_tokens: int | None = None
) -> RenderedPrompt:
    """Render a ``GenerateRequest`` (proto or :class:`Conversation`) to prompt ids, fitting the window.

    Raises InvalidRequest for malformed conversations and when the last user turn (with the system
    prompt) does not fit ``max_prompt_tokens``.
    """
    conv = request if isinstance(request, Conversation) else conversation_from_proto(request)
    turns = conv.turns
    if not turns:
        raise InvalidRequest("the conversation has no turns")
    if turns[-1].role != "user":
        raise InvalidRequest("the last turn must be a user turn (the one to answer)")
    style = style_text(conv.style)

    # Group into exchanges: a user turn and the assistant turn(s) that answer it.
    exchanges: list[tuple[int, list[int]]] = []  # (number of Turn messages, ids)
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        if turn.role == "user":
            exchanges.append((1, _user_ids(turn, i, tok, style if i == last else "")))
        elif turn.role == "assistant":
            if not exchanges:
                raise InvalidRequest(f"turn {i}: an assistant turn must follow a user turn")
            n, ids = exchanges[-1]
            exchanges[-1] = (n + 1, ids + _assistant_ids(turn, i, tok))
        else:
            raise InvalidRequest(f"turn {i}: role must be 'user' or 'assistant'")

    head = [*list(tok.prefix_ids), tok.token_id(SYSTEM)]
    head += tok.encode("\n" + system_prompt(conv.mode), parse_special=False)
    total = len(head) + sum(len(ids) for _, ids in exchanges)
    dropped_turns = dropped_exchanges = 0
    if max_prompt_tokens is not None:
        while total > max_prompt_tokens and len(exchanges) > 1:
            n, ids = exchanges.pop(0)
            total -= len(ids)
            dropped_turns += n
            dropped_exchanges += 1
        if total > max_prompt_tokens:
            raise InvalidRequest(
                f"the last user turn needs {total} prompt tokens with the system prompt, "
                f"more than the {max_prompt_tokens} the context window allows"
            )
    ids = head + [i for _, e in exchanges for i in e]
    return RenderedPrompt(
        ids=ids,
        dropped_turns=dropped_turns,
        dropped_exchanges=dropped_exchanges,
        kept_turns=len(turns) - dropped_turns,
        turn_token_counts=[len(e) for _, e in exchanges],
    )
