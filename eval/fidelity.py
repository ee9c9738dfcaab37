"""Synthetic data against the private data it stands in for: fidelity and diversity.

Fidelity is the Fréchet distance between Gaussians fitted to MiniLM sentence embeddings of the
two sets (as FID does with Inception features): 0 when the means and covariances match. The
estimate is biased by sample size, so both sides use m texts: the synthetic set (m) against a
random private subset B (m), and, as the floor that sampling noise alone gives, another private
subset A (m, disjoint from B) against B. Diversity of the synthetic set: distinct-n (unique n-grams over all n-grams)
and self-BLEU (mean BLEU-4 of each text against all the others; high means repetitive).

It runs on the client: only these figures leave it, never an embedding or a text.
"""

from __future__ import annotations

import random

import numpy as np

from knowledgesg.dedup import words


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for row-sample matrices a and b."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # singular product (fewer samples than dimensions): regularise
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for tokens in (words(t) for t in texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: list[str], max_texts: int = 200, seed: int = 0) -> float:
    """Mean sentence BLEU-4 (NLTK, smoothing method 1) of each text against all the others."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(texts) < 2:
        return 0.0
    sample = random.Random(seed).sample(texts, min(max_texts, len(texts)))
    tokenized = [words(t) for t in sample]
    smooth = SmoothingFunction().method1
    scores = [sentence_bleu(tokenized[:i] + tokenized[i + 1 :], hypothesis, smoothing_function=smooth) for i, hypothesis in enumerate(tokenized) if hypothesis]
    return float(np.mean(scores)) if scores else 0.0


def fidelity_report(private_texts: list[str], synthetic_texts: list[str], embed, seed: int = 0) -> dict:
    """`embed(texts) -> array [n, d]`; every figure computed here, on the client."""
    if len(private_texts) < 4 or len(synthetic_texts) < 2:
        return {"skipped": f"too few texts ({len(private_texts)} private, {len(synthetic_texts)} synthetic)"}
    m = min(len(synthetic_texts), len(private_texts) // 2)
    order = list(range(len(private_texts)))
    random.Random(seed).shuffle(order)
    subset_a, subset_b = order[:m], order[m : 2 * m]
    private = embed([private_texts[i] for i in subset_a + subset_b])
    synthetic = embed(random.Random(seed).sample(synthetic_texts, m))
    return {
        "n_private": len(private_texts), "n_synthetic": len(synthetic_texts), "m": m,
        "frechet_synthetic_vs_private": round(frechet_distance(synthetic, private[m:]), 4),
        "frechet_private_vs_private": round(frechet_distance(private[:m], private[m:]), 4),
        "distinct_1": round(distinct_n(synthetic_texts, 1), 4), "distinct_2": round(distinct_n(synthetic_texts, 2), 4),
        "self_bleu": round(self_bleu(synthetic_texts, seed=seed), 4),
        "private_distinct_2": round(distinct_n(private_texts, 2), 4), "private_self_bleu": round(self_bleu(private_texts, seed=seed), 4),
    }
