"""GLM-4 text tokenizer read from its published files, without remote code.

Files (as published with ``glm-4-voice-9b``):

* ``tokenizer.model`` — one ``base64(token bytes) rank`` line per byte-level BPE token (tiktoken
  ranks; the rank is the token id);
* ``tokenizer_config.json`` — ``added_tokens_decoder`` maps ids to the added/special tokens
  (``<|endoftext|>``, ``[gMASK]``, ``<sop>``, ``<|user|>``, ``<|begin_of_audio|>``, ``<|audio_0|>`` ...).

Encoding matches the reference: added-token strings are split out first, every other piece is
BPE-encoded with the cl100k pre-tokenizer, and a prompt starts with ``[gMASK]<sop>``. Every special
id is looked up from the files, never hard-coded.

Decoding is our own (the reference's is wrong around special tokens): token bytes are
concatenated and decoded as UTF-8 with replacement of invalid sequences; added tokens are emitted
verbatim. :class:`IncrementalDecoder` does the same one token at a time and holds back an incomplete
multi-byte character until the token that completes it arrives, so the concatenation of its pieces
always equals :meth:`GlmTextTokenizer.decode` of the whole sequence.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

from glmv_common.errors import CheckpointError, missing_checkpoint

# The pre-tokenizer of tiktoken's cl100k_base, which GLM-4's tokenizer uses unchanged.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
BEGIN_OF_AUDIO = "<|begin_of_audio|>"
END_OF_AUDIO = "<|end_of_audio|>"
ENDOFTEXT = "<|endoftext|>"
REQUIRED_TOKENS = (GMASK, SOP, SYSTEM, USER, ASSISTANT, BEGIN_OF_AUDIO, END_OF_AUDIO, "<|audio_0|>")

_HOW = "The LM directory must contain the published tokenizer files (tokenizer.model, tokenizer_config.json)"


def audio_token_name(k: int) -> str:
    """The added-token string of speech token ``k``."""
    return f"<|audio_{k}|>"


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse ``tokenizer.model`` (``base64 rank`` lines)."""
    if not path.is_file():
        raise missing_checkpoint(path, "BPE vocabulary (tokenizer.model)", _HOW)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(f"{path}:{lineno}: malformed BPE rank line ({exc})") from exc
    if not ranks:
        raise CheckpointError(f"{path}: empty BPE vocabulary")
    if len(set(ranks.values())) != len(ranks):
        raise CheckpointError(f"{path}: duplicate ranks")
    return ranks


def read_added_tokens(path: Path) -> dict[int, str]:
    """``added_tokens_decoder`` of ``tokenizer_config.json`` as ``{id: content}``."""
    if not path.is_file():
        raise missing_checkpoint(path, "tokenizer_config.json", _HOW)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        decoder = data["added_tokens_decoder"]
        added = {int(i): (t["content"] if isinstance(t, dict) else str(t)) for i, t in decoder.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read added_tokens_decoder: {exc}") from exc
    return added


class GlmTextTokenizer:
    """Encode/decode GLM-4(-Voice) text; look up special and audio token ids."""

    def __init__(self, ranks: dict[bytes, int], added: dict[int, str], source: str = "<memory>") -> None:
        self.source = source
        collide = sorted(set(added) & set(ranks.values()))
        if collide:
            raise CheckpointError(f"{source}: added token ids {collide[:5]} collide with BPE ranks")
        self._added: dict[int, str] = dict(added)
        self._added_ids: dict[str, int] = {s: i for i, s in added.items()}
        if len(self._added_ids) != len(self._added):
            raise CheckpointError(f"{source}: an added token string appears under two ids")
        self._bytes: dict[int, bytes] = {r: b for b, r in ranks.items()}
        self.num_ranks = len(ranks)
        self._enc = tiktoken.Encoding(
            name=f"glm4:{source}", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._added_ids
        )
        missing = [t for t in REQUIRED_TOKENS if t not in self._added_ids]
        if missing:
            raise CheckpointError(f"{source}: tokenizer_config.json lacks required tokens {missing}")
        self.audio_offset = self._added_ids["<|audio_0|>"]
        count = 0
        while self._added_ids.get(audio_token_name(count)) == self.audio_offset + count:
            count += 1
        self.audio_count = count
        self.vocab_size = max(max(self._bytes), max(self._added)) + 1
        self.end_token_id = self._added_ids[USER]
        self.prefix_ids: list[int] = [self._added_ids[GMASK], self._added_ids[SOP]]
        self.eos_token_id: int | None = self._added_ids.get(ENDOFTEXT)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> GlmTextTokenizer:
        """Read ``tokenizer.model`` and ``tokenizer_config.json`` from a model directory."""
        root = Path(model_dir)
        ranks = read_ranks(root / VOCAB_FILE)
        added = read_added_tokens(root / TOKENIZER_CONFIG_FILE)
        return cls(ranks, added, source=str(root))

    @staticmethod
    def has_files(model_dir: str | os.PathLike[str]) -> bool:
        root = Path(model_dir)
        return (root / VOCAB_FILE).is_file() and (root / TOKENIZER_CONFIG_FILE).is_file()

    # -- lookups -----------------------------------------------------------------------------------

    def token_id(self, name: str) -> int:
        """Id of an added/special token by its string, e.g. ``token_id("<|user|>")``."""
        try:
            return self._added_ids[name]
        except KeyError:
            raise KeyError(f"{self.source}: no added token {name!r} in tokenizer_config.json") from None

    def has_token(self, name: str) -> bool:
        return name in self._added_ids

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._added)

    def is_added(self, token_id: int) -> bool:
        """True for added/special tokens (role tags, ``[gMASK]``, audio tokens ...)."""
        return token_id in self._added

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.audio_count

    def is_valid(self, token_id: int) -> bool:
        """True if the id is a BPE token or an added token (not an embedding-padding row)."""
        return token_id in self._bytes or token_id in self._added

    def audio_id(self, speech_token: int) -> int:
        """LM id of speech token ``k`` (``<|audio_k|>``)."""
        if not 0 <= speech_token < self.audio_count:
            raise ValueError(f"speech token {speech_token} outside 0..{self.audio_count - 1}")
        return self.audio_offset + speech_token

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token (an added token's UTF-8 string); b"" for ids with no token."""
        b = self._bytes.get(token_id)
        if b is not None:
            return b
        s = self._added.get(token_id)
        return s.encode("utf-8") if s is not None else b""

    # -- encode / decode ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_prefix: bool = False, parse_special: bool = True) -> list[int]:
        """Encode text. With ``parse_special`` added-token strings in ``text`` become their ids (as the
        reference tokenizer does); without, they are ordinary text. ``add_prefix`` prepends
        ``[gMASK]<sop>`` like the reference ``tokenizer(prompt)``."""
        if parse_special:
            ids = self._enc.encode(text, allowed_special="all")
        else:
            ids = self._enc.encode_ordinary(text)
        return self.prefix_ids + ids if add_prefix else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ids to text: BPE bytes as UTF-8 (invalid sequences → U+FFFD), added tokens verbatim
        (or left out with ``skip_special_tokens``); ids with no token are left out."""
        dec = IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)
        return "".join(dec.push(i) for i in ids) + dec.flush()

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            "num_ranks": self.num_ranks,
            "num_added": len(self._added),
            "vocab_size": self.vocab_size,
            "audio_offset": self.audio_offset,
            "audio_count": self.audio_count,
            "end_token_id": self.end_token_id,
            "prefix_ids": self.prefix_ids,
        }


class IncrementalDecoder:
    """Streaming, UTF-8-safe detokenizer: ``push(id)`` returns the text that token completes.

    A multi-byte character split across BPE tokens is returned once, by the token that completes it.
    An added token first terminates any pending incomplete bytes (they become U+FFFD, exactly as in
    a one-shot decode), then returns its own string (or "" with ``skip_special_tokens``).
    """

    def __init__(self, tokenizer: GlmTextTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        b = self._tok._bytes.get(token_id)
        if b is not None:
            return self._utf8.decode(b)
        special = self._tok._added.get(token_id)
        if special is None:
            return ""
        pending = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return pending if self._skip else pending + special

    def flush(self) -> str:
        """Text held back at the end (an incomplete character becomes U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while an incomplete UTF-8 sequence is held back."""
        return bool(self._utf8.getstate()[0])
