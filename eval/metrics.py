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
- One-run epsilon lower bound (Steinke, Nasr and Jagielski 2023): m canaries included with
  probability 1/2; the auditor guesses "in" for the r+ highest scores and "out" for the r-
  lowest. Under (epsilon, delta)-DP, P[at least v of r guesses correct] is at most
  P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha, with
  alpha = max_i P[v > Binomial(r, .) >= v - i] / i (their Theorem 5.2, the delta term included).
  The largest epsilon at which v correct guesses are still at least 5% likely bounds epsilon from
  below with 95% confidence. A canary repeated k times is a group of k units: the bound is
  about the group's epsilon (see privacy.accounting.group_epsilon), not the per-unit one.
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


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, m canaries (Steinke et al. 2023, Thm 5.2)."""
    from scipy import stats

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = 1 / (1 + math.exp(-epsilon))
    tail = binomial_tail(r, v, p)
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[W = v-1], P[W = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(r: int, v: int, confidence: float = 0.95, m: int | None = None, delta: float = 0.0) -> float:
    """The largest epsilon at which v or more correct of r guesses still has probability >= 1 - confidence."""
    beta = 1 - confidence
    m = r if m is None else m
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0  # no better than coin flips at this confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) < beta

    low, high = 0.0, 1.0
    while rejected(high) and high < 100:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def one_run_audit(scores: list[float], included: list[bool], guesses: int, confidence: float = 0.95, delta: float = 0.0) -> dict:
    """Guess "in" for the guesses/2 highest scores and "out" for the guesses/2 lowest; the bound
    holds for (epsilon, delta)-DP with the delta given (the canary unit's)."""
    if guesses < 2 or guesses > len(scores):
        raise ValueError(f"guesses must be between 2 and the {len(scores)} canaries, got {guesses}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    half = guesses // 2
    guessed_in, guessed_out = order[:half], order[len(order) - (guesses - half):]
    correct = sum(included[i] for i in guessed_in) + sum(not included[i] for i in guessed_out)
    m = len(scores)
    return {"canaries": m, "guesses": guesses, "correct": correct, "delta": delta,
            "epsilon_lower_bound": round(epsilon_lower_bound(guesses, correct, confidence, m, delta), 4),
            "largest_certifiable": round(epsilon_lower_bound(guesses, guesses, confidence, m, delta), 4), "confidence": confidence}
