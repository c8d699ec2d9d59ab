"""Reuse of a finished request's keys and values by the next request that starts with its tokens.

A spoken conversation re-sends its whole history every turn: the next prompt is the previous prompt,
the previous reply (re-inserted from its ids), and the new user turn. Without reuse, every turn
prefills the whole conversation again. When a request finishes, the engine keeps the keys and
values of the tokens it fed (prompt + reply) here. A new prompt that shares a long enough prefix
with a kept entry copies that prefix into its cache slot and prefills only the rest.

Entries are kept least-recently-used within a token budget. An entry that is a prefix of a newer one
(the same conversation one turn earlier) is dropped when the newer one is stored. Reuse is exact up
to floating-point rounding: the kept values are what the model computed for those positions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from glmv_lm.kv_cache import SlotKVCache


@dataclass
class _Entry:
    tokens: list[int]
    keys: list[torch.Tensor]  # per layer [kv_heads, len, head_dim]
    values: list[torch.Tensor]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search over slice comparisons, which run in C:
    a few thousand tokens against dozens of entries stays well under a millisecond)."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    def __init__(self, budget_tokens: int, min_tokens: int = 64) -> None:
        self.budget_tokens = budget_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self.tokens = 0  # tokens held

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[int, int]:
        """(entry id, reusable tokens) of the longest shared prefix, or (-1, 0). At least one prompt
        token is always left to prefill (its logits pick the first reply token)."""
        best, best_len = -1, 0
        for entry_id, entry in self._entries.items():
            n = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if n > best_len:
                best, best_len = entry_id, n
        if best_len < self.min_tokens:
            return -1, 0
        self._entries.move_to_end(best)
        return best, best_len

    def load(self, entry_id: int, length: int, cache: SlotKVCache, slot: int) -> bool:
        """Copy the first ``length`` positions of an entry into a cache slot (False: evicted since)."""
        entry = self._entries.get(entry_id)
        if entry is None or length > len(entry.tokens):
            return False
        cache.reserve(length)
        for layer in range(cache.num_layers):
            cache.keys[layer][slot, :, :length].copy_(entry.keys[layer][:, :length])
            cache.values[layer][slot, :, :length].copy_(entry.values[layer][:, :length])
        return True

    def store(self, tokens: list[int], cache: SlotKVCache, slot: int) -> None:
        """Keep the keys and values of ``tokens`` (the first ``len(tokens)`` positions of ``slot``)."""
        length = len(tokens)
        if length < self.min_tokens or length > self.budget_tokens:
            return
        superseded = [i for i, e in self._entries.items() if common_prefix(e.tokens, tokens) == len(e.tokens)]
        for entry_id in superseded:  # the same conversation, shorter
            self._drop(entry_id)
        entry = _Entry(
            list(tokens),
            [cache.keys[layer][slot, :, :length].clone() for layer in range(cache.num_layers)],
            [cache.values[layer][slot, :, :length].clone() for layer in range(cache.num_layers)],
        )
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.tokens += length
        while self.tokens > self.budget_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.tokens -= len(entry.tokens)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
