"""The in-place key-value cache gives the model exactly what DynamicCache gives it, and appends
without copying the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from knowledgesg.kv_cache import RoomyCache
from knowledgesg.models import load_causal_lm, resolve_model


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm(resolve_model("tiny-random-llama"))


def _decode(model, cache, prompt: torch.Tensor, steps: int, selections: dict[int, list[int]]) -> list[torch.Tensor]:
    """Logits of a prefill and `steps` greedy steps; after step k the batch keeps the rows
    `selections[k]` (rows leaving, as in the engine; rows copied or reordered, as after a shared
    prefill)."""
    seen = []
    ids, mask = prompt, torch.ones_like(prompt)
    with torch.no_grad():
        for step in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            seen.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            if step in selections:
                keep = torch.tensor(selections[step])
                cache.batch_select_indices(keep)
                ids, mask = ids[keep], mask[keep]
    return seen


def test_roomy_cache_gives_the_logits_of_dynamic_cache_through_growth_reordering_and_row_removal(tiny):
    model, _ = tiny
    prompt = torch.randint(5, model.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    selections = {1: [3, 0, 0, 2], 3: [0, 2, 3], 5: [1, 2]}  # reorder with a repeat, then rows leave (a hole, then the first row)
    reference = _decode(model, DynamicCache(), prompt, 8, selections)
    for room in (0, 2, 16):  # room 0 and 2 outgrow their buffers and must reallocate on the way
        for ours, theirs in zip(_decode(model, RoomyCache(room), prompt, 8, selections), reference, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_roomy_cache_appends_in_place_within_its_room(tiny):
    model, _ = tiny
    cache = RoomyCache(room=4)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        buffers = [layer._keys.data_ptr() for layer in cache.layers]
        for _ in range(4):
            model(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)
        assert [layer._keys.data_ptr() for layer in cache.layers] == buffers  # no copy while there is room
        assert cache.get_seq_length() == 7
        model(input_ids=torch.tensor([[9]]), past_key_values=cache, use_cache=True)
        assert cache.layers[0]._keys.data_ptr() != buffers[0] and cache.get_seq_length() == 8


def test_roomy_cache_repeat_and_crop_match_dynamic_cache(tiny):
    model, _ = tiny
    prefix, rows = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10], [11, 12], [13, 14]])
    logits = []
    for cache in (DynamicCache(), RoomyCache(room=3)):
        with torch.no_grad():
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the last prefix token, then run it again with each row
            cache.batch_repeat_interleave(3)
            logits.append(model(input_ids=torch.cat([prefix[:, -1:].repeat(3, 1), rows], dim=1), past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)


def test_roomy_cache_reset_and_reorder_match_dynamic_cache(tiny):
    """After a reset the cache holds a new batch of another size; reorder_cache (beam search)
    moves the rows the next step reads."""
    model, _ = tiny
    first, second = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[11, 12, 13, 14], [20, 21, 22, 23], [24, 25, 26, 27]])
    logits = []
    for cache in (DynamicCache(), RoomyCache(room=8)):
        with torch.no_grad():
            model(input_ids=first, past_key_values=cache, use_cache=True)
            cache.reset()
            model(input_ids=second, past_key_values=cache, use_cache=True)
            cache.reorder_cache(torch.tensor([2, 2, 0]))
            after_reorder = model(input_ids=torch.tensor([[15], [16], [17]]), past_key_values=cache, use_cache=True).logits
            cache.batch_select_indices(torch.tensor([False, True, True]))
            logits.append((after_reorder, model(input_ids=torch.tensor([[18], [19]]), past_key_values=cache, use_cache=True).logits))
    for ours, theirs in zip(logits[1], logits[0]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
