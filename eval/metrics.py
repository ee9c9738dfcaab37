"""The leakage metrics, as pure functions of scores (each tested on a hand-computed case).

- Exposure (Carlini et al. 2019): log2 |R| - log2 rank of the canary's secret among all candidate
  secrets R by model loss. Enumerated when R is small; otherwise extrapolated from a sample of
  random candidates: fit a skew-normal to their losses and read the share of R that would beat
  the canary off its CDF, exposure = -log2 CDF(loss of the canary).
- Membership inference scores, higher meaning "member": loss, zlib ratio (Carlini et al. 2021),
  reference model (the loss drop from the base model), Min-K% (Shi et al. 2024: the mean of the
  lowest k% token log-probabilities) and Min-K%++ (Zhang et al. 2024: the same over token
  log-probabilities standardised by the mean and std of log p under the model's next-token
  distribution). AUC and TPR at 1% FPR.
- One-run epsilon lower bound (Steinke, Nasr and Jagielski 2023): canaries included with
  probability 1/2; the auditor guesses "in" for the r+ highest scores and "out" for the r-
  lowest. Under (epsilon, 0)-DP the number of correct guesses among r = r+ + r- is stochastically
  dominated by Binomial(r, e^eps / (1 + e^eps)), so the largest epsilon at which v correct
  guesses are still at least 5% likely bounds epsilon from below with 95% confidence. (The
  delta term of their theorem is left out, as delta is far below 1/r here.)
"""

from __future__ import annotations

import math
import zlib

import numpy as np


def exposure_exact(canary_loss: float, candidate_losses: np.ndarray) -> float:
    """All of R scored (the canary's own secret among them): rank 1 is the lowest loss."""
    losses = np.asarray(candidate_losses, dtype=float)
    rank = 1 + int((losses < canary_loss).sum())
    return math.log2(len(losses)) - math.log2(rank)


def exposure_extrapolated(canary_loss: float, sample_losses: np.ndarray, space_size: float) -> float:
    """-log2 of the share of R with a lower loss, from a skew-normal fitted to a random sample of R."""
    from scipy import stats

    shape, loc, scale = stats.skewnorm.fit(np.asarray(sample_losses, dtype=float))
    log_cdf = float(stats.skewnorm.logcdf(canary_loss, shape, loc, scale))
    exposure = -log_cdf / math.log(2)
    return float(min(max(exposure, 0.0), math.log2(space_size)))


def zlib_entropy(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def score_loss(token_logprobs: np.ndarray) -> float:
    return float(np.mean(token_logprobs))


def score_zlib(token_logprobs: np.ndarray, text: str) -> float:
    """Log-likelihood over zlib entropy: a sequence that is likely yet not compressible is suspicious."""
    return float(np.sum(token_logprobs)) / zlib_entropy(text)


def score_reference(token_logprobs: np.ndarray, reference_logprobs: np.ndarray) -> float:
    return float(np.mean(token_logprobs) - np.mean(reference_logprobs))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    values = np.sort(np.asarray(values, dtype=float))
    count = max(1, int(math.ceil(k * len(values))))
    return float(values[:count].mean())


def score_min_k(token_logprobs: np.ndarray, k: float = 0.2) -> float:
    return _lowest_mean(token_logprobs, k)


def score_min_k_plus_plus(token_logprobs: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float = 0.2) -> float:
    standardised = (np.asarray(token_logprobs) - np.asarray(mu)) / np.maximum(np.asarray(sigma), 1e-8)
    return _lowest_mean(standardised, k)


def roc(member_scores: list[float], nonmember_scores: list[float]) -> dict:
    """AUC, TPR at 1% FPR and the curve (higher score = member)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    scores = list(member_scores) + list(nonmember_scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": round(float(roc_auc_score(labels, scores)), 4), "tpr_at_1pct_fpr": round(tpr_at_fpr(fpr, tpr, 0.01), 4),
            "fpr": [round(float(x), 4) for x in fpr], "tpr": [round(float(x), 4) for x in tpr]}


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    allowed = np.asarray(fpr) <= target
    return float(np.asarray(tpr)[allowed].max()) if allowed.any() else 0.0


def binomial_tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) >= v]."""
    from scipy import stats

    return float(stats.binom.sf(v - 1, r, p))


def epsilon_lower_bound(r: int, v: int, confidence: float = 0.95) -> float:
    """The largest epsilon at which v or more correct of r guesses still has probability >= 1 - confidence."""
    beta = 1 - confidence
    if r == 0 or binomial_tail(r, v, 0.5) > beta:
        return 0.0  # no better than coin flips at this confidence

    def tail(eps: float) -> float:
        return binomial_tail(r, v, 1 / (1 + math.exp(-eps)))

    low, high = 0.0, 1.0
    while tail(high) <= beta and high < 100:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) <= beta else (low, mid)
    return low


def one_run_audit(scores: list[float], included: list[bool], guesses: int, confidence: float = 0.95) -> dict:
    """Guess "in" for the guesses/2 highest scores and "out" for the guesses/2 lowest."""
    if guesses < 2 or guesses > len(scores):
        raise ValueError(f"guesses must be between 2 and the {len(scores)} canaries, got {guesses}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    half = guesses // 2
    guessed_in, guessed_out = order[:half], order[len(order) - (guesses - half):]
    correct = sum(included[i] for i in guessed_in) + sum(not included[i] for i in guessed_out)
    return {"canaries": len(scores), "guesses": guesses, "correct": correct,
            "epsilon_lower_bound": round(epsilon_lower_bound(guesses, correct, confidence), 4),
            "largest_certifiable": round(epsilon_lower_bound(guesses, guesses, confidence), 4), "confidence": confidence}
