"""A key-value cache that appends in place.

transformers' DynamicCache appends each decode step's keys and values with `torch.cat`, which
copies the whole cache of every layer at every step: 1.08x the step time at batch 64 with
150-token contexts, 1.33x with 400 (`benchmarks/results/kv_cache_append.md`). Here each layer keeps its
keys and values in a buffer with room for the tokens still to come, and a step writes one column
into it. The attention reads a view of the filled part, so the model code is unchanged.

Kept apart from `generation.py` because it imports torch and transformers at load time, which the
stages that only need `SamplingParams` should not pay for.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are views of buffers `room` tokens longer than
    needed when they were last allocated; it reallocates only when a write would not fit. The
    inherited `crop` shortens the views, and the dropped columns become room again."""

    def __init__(self, room: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.room = room
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2] or self._keys.shape[0] != key_states.shape[0]:
            self._keys, self._values = self._reallocated(self._keys, key_states, length, end), self._reallocated(self._values, value_states, length, end)
        self._keys[:, :, length:end] = key_states
        self._values[:, :, length:end] = value_states
        self._view(end)
        return self.keys, self.values

    def _reallocated(self, buffer: torch.Tensor | None, new: torch.Tensor, length: int, end: int) -> torch.Tensor:
        batch, heads, _, dim = new.shape
        grown = new.new_empty((batch, heads, end + self.room, dim))
        if length:
            grown[:, :, :length] = buffer[:, :, :length]
        return grown

    def _view(self, length: int) -> None:
        self.keys = self._keys[:, :, :length]
        self.values = self._values[:, :, :length]

    def reset(self) -> None:
        self._keys = self._values = None
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)  # the inherited one would reorder the views only

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            length = self.get_seq_length()
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view(length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # one gather per buffer, room included: moving the kept rows up inside the buffer, row by
        # row, was slower here (a Python loop of up to batch x layers copies each time a row left)
        length = self.get_seq_length()
        if length > 0:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._view(length)


class RoomyCache(DynamicCache):
    """A DynamicCache of RoomyLayers, each with `room` spare token slots (give it the number of
    tokens still to be generated)."""

    def __init__(self, room: int = 0) -> None:
        super().__init__()
        self.layer_class_to_replicate = lambda: RoomyLayer(room)
