"""Token-aware chunks of long text, with overlap so that no sentence is lost at a boundary."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    record_id: str
    index: int
    text: str
    start_token: int
    end_token: int


def chunk_text(tokenizer, record_id: str, text: str, chunk_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Windows of at most `chunk_tokens` tokens that overlap by at least `overlap_tokens`.

    Both ends of a window are moved back to a word boundary (the end only as far as half the
    window), so that no word is cut in two.
    """
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens ({overlap_tokens}) must be in [0, chunk_tokens={chunk_tokens})")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)

    def starts_word(i: int) -> bool:
        begin = offsets[i][0]
        return begin == 0 or text[begin - 1].isspace() or text[begin].isspace()

    chunks, start = [], 0
    while start < n:
        end = min(start + chunk_tokens, n)
        if end < n:
            end = next((cut for cut in range(end, start + chunk_tokens // 2, -1) if starts_word(cut)), end)
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            chunks.append(Chunk(record_id, len(chunks), piece, start, end))
        if end >= n:
            break
        next_start = end - overlap_tokens
        while next_start > start + 1 and not starts_word(next_start):
            next_start -= 1
        start = next_start
    return chunks
