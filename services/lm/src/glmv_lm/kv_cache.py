"""A slot-based key/value cache for continuous batching over transformers' GLM attention.

Each running request owns one slot (a row of every layer's buffer); inside a slot the cache index of
a token equals its position id, so rows of different lengths decode together without left padding:
the attention mask hides each row's unused tail. Active requests always occupy slots ``0..n-1``; when
one leaves, the last slot is moved into the hole (:meth:`SlotKVCache.move`), so a decode step reads a
plain view of the first ``n`` rows. The length dimension grows on demand (doubling) up to the model's
context, and shrinks back when the engine is idle.

The object duck-types the one method transformers' ``GlmAttention`` calls on its cache,
``update(key, value, layer_idx)``; the engine selects what that call does with :meth:`for_prefill` or
:meth:`for_decode` before each forward pass.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        max_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_len: int = 256,
    ) -> None:
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.initial_len = min(initial_len, max_len)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._mode: tuple[str, int, int, torch.Tensor | None, int] | None = None
        self._chunk_start = 0
        self._rows: torch.Tensor | None = None
        self.reserve(self.initial_len)

    # -- memory -------------------------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per slot (grows by doubling, capped at ``max_len``)."""
        if length > self.max_len:
            raise ValueError(f"cache length {length} exceeds the context window {self.max_len}")
        if length <= self.capacity:
            return
        new_cap = min(self.max_len, max(length, 2 * self.capacity, self.initial_len))
        shape = (self.max_slots, self.num_kv_heads, new_cap, self.head_dim)
        old_k, old_v, old_cap = self.keys, self.values, self.capacity
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        if old_cap:
            for layer in range(self.num_layers):
                self.keys[layer][:, :, :old_cap].copy_(old_k[layer])
                self.values[layer][:, :, :old_cap].copy_(old_v[layer])
        self.capacity = new_cap

    def shrink(self) -> None:
        """Drop all contents and return to the initial size (call only when no slot is in use)."""
        if self.capacity > self.initial_len:
            self.keys, self.values, self.capacity = [], [], 0
            self.reserve(self.initial_len)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, :length].copy_(self.keys[layer][src, :, :length])
            self.values[layer][dst, :, :length].copy_(self.values[layer][src, :, :length])

    # -- forward modes ------------------------------------------------------------------------------
    def for_prefill(self, first_slot: int, count: int, length: int) -> None:
        """Next forward: ``count`` prompts (right-padded to ``length``) fill slots from ``first_slot``."""
        if first_slot + count > self.max_slots:
            raise ValueError("not enough cache slots")
        self.reserve(length)
        self._mode = ("prefill", first_slot, count, None, length)

    def for_chunk(self, slot: int, start: int, end: int) -> None:
        """Next forward: prompt positions ``start..end-1`` of one request in ``slot`` (chunked
        prefill); attention reads positions ``0..end-1`` of that slot."""
        if not 0 <= slot < self.max_slots:
            raise ValueError("no such cache slot")
        self.reserve(end)
        self._chunk_start = start
        self._mode = ("chunk", slot, 1, None, end)

    def for_decode(self, count: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: one token per slot ``0..count-1``, written at ``positions`` [count]; attention
        reads the first ``kv_len`` positions."""
        self.reserve(kv_len)
        self._rows = torch.arange(count, device=positions.device)
        self._mode = ("decode", 0, count, positions, kv_len)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mode is None:
            raise RuntimeError("SlotKVCache.update called without for_prefill/for_decode")
        kind, first, count, positions, length = self._mode
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if kind == "prefill":
            k_view = k_buf[first : first + count, :, :length]
            v_view = v_buf[first : first + count, :, :length]
            k_view.copy_(key_states)
            v_view.copy_(value_states)
            return k_view, v_view
        if kind == "chunk":
            start = self._chunk_start
            k_buf[first, :, start:length].copy_(key_states[0])
            v_buf[first, :, start:length].copy_(value_states[0])
            return k_buf[first : first + 1, :, :length], v_buf[first : first + 1, :, :length]
        assert positions is not None and self._rows is not None
        rows = self._rows
        k_buf[rows, :, positions] = key_states[:, :, 0]
        v_buf[rows, :, positions] = value_states[:, :, 0]
        return k_buf[:count, :, :length], v_buf[:count, :, :length]
