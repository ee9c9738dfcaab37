"""Exact and near-duplicate detection for generated text (MinHash LSH over character 5-grams)."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters and digits)."""
    return re.findall(r"\w+", text.lower())


def normalized(text: str) -> str:
    """Single-spaced words: the key for exact duplicates."""
    return " ".join(words(text))


def near_duplicates(texts: list[str], threshold: float, seed: int) -> set[int]:
    """Indices of texts whose shingles are (by MinHash) at least `threshold`-Jaccard-similar to an
    earlier kept text's. Character 5-grams work for a short question and a long passage alike."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dropped = set()
    for index, text in enumerate(texts):
        key = normalized(text)
        signature = MinHash(num_perm=128, seed=seed)
        for i in range(max(1, len(key) - 4)):
            signature.update(key[i : i + 5].encode())
        if lsh.query(signature):
            dropped.add(index)
        else:
            lsh.insert(str(index), signature)
    return dropped
