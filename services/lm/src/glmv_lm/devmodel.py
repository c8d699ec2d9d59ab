"""Write a tiny random GLM-4-Voice LM checkpoint in exactly the published on-disk layout.

``write_dev_checkpoint(out_dir)`` writes, deterministically for a seed:

* ``config.json`` — ChatGLM field names (``num_layers``, ``kv_channels``, ``multi_query_group_num``,
  ``padded_vocab_size``, ``seq_length``, ``rope_ratio`` ...), ``model_type: chatglm``;
* ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` — ``transformer.*`` keys,
  fused ``query_key_value`` and ``dense_h_to_4h``, untied ``output_layer``, the rotary
  ``inv_freq`` buffer;
* ``tokenizer.model`` — a small byte-level BPE (256 bytes + merges trained on a built-in corpus)
  as ``base64 rank`` lines;
* ``tokenizer_config.json`` — the GLM-4 special tokens (same names, same order, right after the
  BPE ranks), a gap of unassigned ids, then ``<|audio_0|>`` .. ``<|audio_{codebook-1}|>``;
* ``generation_config.json``.

The vocabulary is padded to a multiple of 64 with rows that have no token, like the published
168960-row embedding.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors.torch import save_file

from glmv_lm.text_tokenizer import PAT_STR, audio_token_name

# The GLM-4 added tokens, in their published order (ids 151329..151344 in glm-4-voice-9b).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
)
RESERVED_GAP = 16  # unassigned ids between the specials and <|audio_0|> (1008 in the published vocab)


@dataclass(frozen=True)
class DevSize:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    kv_channels: int
    multi_query_group_num: int
    seq_length: int
    bpe_merges: int
    shards: int


SIZES: dict[str, DevSize] = {
    # ~hundreds of tokens/s on one CPU core.
    "dev": DevSize(2, 64, 128, 4, 16, 2, 4096, 256, 2),
    # Mid-size for benchmarks on 2 cores (~25M parameters).
    "mid": DevSize(8, 512, 1408, 8, 64, 2, 8192, 768, 3),
}

_CORPUS = """
The quick brown fox jumps over the lazy dog. A voice assistant listens to the user, thinks about
the request and answers in a friendly way. Please speak slowly and clearly. What is the weather
like today? It is sunny and warm, with a light breeze from the sea in the afternoon.
I would like to book a table for two people at seven o'clock tonight. Thank you very much!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 100 2024 3.14159. Emotions: happy, sad, angry, calm, excited.
Speak faster, speak slower, use a cheerful tone, whisper, sing. English, Chinese, Cantonese.
streaming_transcription streaming transcription user assistant system instruction interleaved
User will provide you with a speech instruction. Do it step by step. First, think about the
instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens.
User will provide you with a text instruction.
你好，今天天气怎么样？我很好，谢谢你。请用北京话说一遍。请说得慢一点。我们一起去吃饭吧！
语音助手可以听懂用户的问题，并且用自然的声音回答。开心、难过、生气、平静、兴奋。
Bonjour, comment ça va? Très bien, merci. ¿Dónde está la biblioteca? Größe, Straße, naïve café.
こんにちは、元気ですか。안녕하세요. Emoji: 😀 🎉 👍 ❤️ — “quotes” and ‘apostrophes’…
"""


def train_bpe(corpus: str, merges: int) -> list[bytes]:
    """Byte-level BPE on ``corpus`` with the cl100k pre-tokenizer; returns tokens in rank order.

    Ranks 0..255 are the single bytes; each merge adds the most frequent adjacent pair (ties broken
    by the smaller byte string), so every token is reachable by tiktoken's lowest-rank-first merging.
    """
    words = Counter(regex.findall(PAT_STR, corpus))
    seqs: list[tuple[list[bytes], int]] = [
        ([bytes([c]) for c in w.encode("utf-8")], n) for w, n in words.items()
    ]
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for seq, n in seqs:
            for a, b in itertools.pairwise(seq):
                pairs[(a, b)] += n
        candidates = [(n, p) for p, n in pairs.items() if p[0] + p[1] not in known]
        if not candidates:
            break
        best_n = max(n for n, _ in candidates)
        if best_n < 2:
            break
        a, b = min(p for n, p in candidates if n == best_n)
        merged = a + b
        vocab.append(merged)
        known.add(merged)
        for seq, _ in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == a and seq[i + 1] == b:
                    seq[i : i + 2] = [merged]
                i += 1
    return vocab


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer(out: Path, merges: int, codebook_size: int) -> dict[str, int]:
    """Write ``tokenizer.model`` and ``tokenizer_config.json``; return the special-token ids."""
    vocab = train_bpe(_CORPUS, merges)
    with (out / "tokenizer.model").open("w", encoding="ascii", newline="\n") as f:
        for rank, token in enumerate(vocab):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    n = len(vocab)
    ids = {name: n + i for i, name in enumerate(GLM_SPECIAL_TOKENS)}
    audio_offset = n + len(GLM_SPECIAL_TOKENS) + RESERVED_GAP
    decoder = {str(i): _added_token_entry(name) for name, i in ids.items()}
    for k in range(codebook_size):
        decoder[str(audio_offset + k)] = _added_token_entry(audio_token_name(k))
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(GLM_SPECIAL_TOKENS[:14]),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    ids["<|audio_0|>"] = audio_offset
    ids["__end__"] = audio_offset + codebook_size
    return ids


def chatglm_config(size: DevSize, padded_vocab: int, eos: list[int], pad: int) -> dict[str, Any]:
    """config.json in the published ChatGLM field names (values of glm-4-voice-9b where not sized)."""
    return {
        "_name_or_path": "glmv-dev-lm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMModel"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "eos_token_id": eos,
        "ffn_hidden_size": size.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": size.hidden_size,
        "kv_channels": size.kv_channels,
        "layernorm_epsilon": 1.5625e-07,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": size.multi_query_group_num,
        "num_attention_heads": size.num_attention_heads,
        "num_hidden_layers": size.num_layers,
        "num_layers": size.num_layers,
        "original_rope": True,
        "pad_token_id": pad,
        "padded_vocab_size": padded_vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": 1,
        "seq_length": size.seq_length,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "vocab_size": padded_vocab,
    }


def random_chatglm_weights(size: DevSize, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights with ChatGLM keys and shapes, in the reference state-dict order."""
    g = torch.Generator().manual_seed(seed)
    h, heads, d, groups = (
        size.hidden_size,
        size.num_attention_heads,
        size.kv_channels,
        size.multi_query_group_num,
    )
    qkv = heads * d + 2 * groups * d

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(h, std=0.1)

    rot = d // 2
    sd: dict[str, torch.Tensor] = {
        "transformer.embedding.word_embeddings.weight": normal(vocab, h, std=1.0 / math.sqrt(h) * 4),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)),
    }
    for i in range(size.num_layers):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_weight()
        sd[p + "self_attention.query_key_value.weight"] = normal(qkv, h, std=1.0 / math.sqrt(h))
        sd[p + "self_attention.query_key_value.bias"] = normal(qkv, std=0.1)
        sd[p + "self_attention.dense.weight"] = normal(h, heads * d, std=1.0 / math.sqrt(heads * d))
        sd[p + "post_attention_layernorm.weight"] = norm_weight()
        sd[p + "mlp.dense_h_to_4h.weight"] = normal(2 * size.ffn_hidden_size, h, std=1.0 / math.sqrt(h))
        sd[p + "mlp.dense_4h_to_h.weight"] = normal(
            h, size.ffn_hidden_size, std=1.0 / math.sqrt(size.ffn_hidden_size)
        )
    sd["transformer.encoder.final_layernorm.weight"] = norm_weight()
    sd["transformer.output_layer.weight"] = normal(vocab, h, std=1.0 / math.sqrt(h) * 2)
    return sd


def write_shards(out: Path, state: dict[str, torch.Tensor], shards: int, dtype: torch.dtype) -> None:
    """Split ``state`` (in order) into ``shards`` safetensors files plus the HF index."""
    names = list(state)
    sizes = {n: state[n].numel() * torch.empty((), dtype=dtype).element_size() for n in names}
    target = sum(sizes.values()) / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n in names:
        if acc >= target and len(groups) < shards:
            groups.append([])
            acc = 0
        groups[-1].append(n)
        acc += sizes[n]
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            t = state[n].to(dtype).contiguous()
            tensors[n] = t
            total += t.numel() * t.element_size()
            weight_map[n] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_dev_checkpoint(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    codebook_size: int = 64,
    size: str = "dev",
    dtype: str = "float32",
) -> Path:
    """Write a random GLM-4-Voice LM (ChatGLM layout) and tokenizer to ``out_dir``; return the path."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if codebook_size < 1:
        raise ValueError("codebook_size must be >= 1")
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model-*-of-*.safetensors"):
        old.unlink()
    ids = write_tokenizer(out, spec.bpe_merges, codebook_size)
    padded_vocab = (ids["__end__"] // 64 + 1) * 64
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    pad = ids["<|endoftext|>"]
    cfg = chatglm_config(spec, padded_vocab, eos, pad)
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {
        "_from_model_config": False,
        "do_sample": True,
        "eos_token_id": eos,
        "max_length": spec.seq_length,
        "pad_token_id": pad,
        "temperature": 0.8,
        "top_p": 0.8,
        "transformers_version": "4.44.1",
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = random_chatglm_weights(spec, padded_vocab, seed)
    write_shards(out, state, spec.shards, torch_dtype)
    return out
