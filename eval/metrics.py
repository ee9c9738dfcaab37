"""The leakage metrics, as pure functions of scores (each tested on a hand-computed case).

- Exposure (Carlini et al. 2019): log2 |R| - log2 rank of the canary's secret among all candidate
  secrets R by model loss. Enumerated when R is small; otherwise extrapolated from a sample of
  random candidates: fit a skew-normal to their losses and read the share of R that would beat
  the canary off its CDF, exposure = -log2 CDF(loss of the canary).
- Membership inference scores, higher meaning "member": loss, zlib ratio (Carlini et al. 2021),
  reference model (the loss drop from the base model), Min-K% (Shi et al. 2024: the mean of the
  lowest k% token log-probabilities) and Min-K%++ (Zhang et al. 2024: the same over token
  log-probabilities standardised by the mean and std of log p under the model's next-token
  distribution), and an RMIA-style likelihood ratio against the base model (Zarifzadeh et al.
  2024). AUC and TPR at 1% and 0.1% FPR, with bootstrap intervals.
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
    """All of R scored (the canary's own secret among them). The rank is Carlini et al.'s, |{r in R:
    loss(r) <= loss(own)}|: a tie counts against the canary (every loss equal is exposure 0, not
    the maximum)."""
    losses = np.asarray(candidate_losses, dtype=float)
    rank = max(1, int((losses <= canary_loss).sum()))
    return math.log2(len(losses)) - math.log2(rank)


def exposure_extrapolated(canary_loss: float, sample_losses: np.ndarray, space_size: float) -> float:
    """-log2 of the share of R with a lower loss, from a skew-normal fitted to a random sample of R;
    where the sample cannot be fitted (all its losses equal), from the sample's own ranks."""
    from scipy import stats

    sample = np.asarray(sample_losses, dtype=float)
    if np.ptp(sample) == 0:
        return float(min(max(exposure_exact(canary_loss, np.append(sample, canary_loss)), 0.0), math.log2(space_size)))
    shape, loc, scale = stats.skewnorm.fit(sample)
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


def score_rmia(token_logprobs: np.ndarray, reference_logprobs: np.ndarray, a: float = 0.3) -> float:
    """RMIA-style score (Zarifzadeh et al. 2024), offline with one reference model, the base model:
    the likelihood ratio p_target(x) / p(x), with p(x) approximated from the reference (an OUT
    model) as ((1 + a) p_ref + (1 - a)) / 2, token by token, and averaged in log space over the
    sequence. With their gamma = 1 the comparison against population samples is monotone in this
    ratio, so the ratio ranks the records as RMIA does."""
    marginal = ((1 + a) * np.exp(np.asarray(reference_logprobs, dtype=float)) + (1 - a)) / 2
    return float(np.mean(np.asarray(token_logprobs, dtype=float) - np.log(marginal)))


FPR_TARGETS = (0.01, 0.001)


def roc(member_scores: list[float], nonmember_scores: list[float], bootstrap: int = 0, seed: int = 0, curve_points: int = 200) -> dict:
    """AUC and TPR at 1% and 0.1% FPR (higher score = member), each with a 95% bootstrap interval
    when `bootstrap` resamples are asked for, and the curve (thinned to about `curve_points`).

    A TPR at an FPR below 1/(non-members) is the TPR at no false positive at all: `measurable`
    says whether the target FPR is at least one non-member."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members, others = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
    scores = np.r_[members, others]
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # every threshold: the TPR at an FPR is exact, as in the bootstrap
    result = {"auc": round(float(roc_auc_score(labels, scores)), 4), "members": len(members), "non_members": len(others)}
    intervals = _bootstrap_intervals(members, others, bootstrap, seed) if bootstrap else {}
    for target in FPR_TARGETS:
        key = f"tpr_at_{_pct(target)}_fpr"
        result[key] = round(tpr_at_fpr(fpr, tpr, target), 4)
        result[f"{key}_measurable"] = target * len(others) >= 1
        if intervals:
            result[f"{key}_ci"] = intervals[key]
    if intervals:
        result["auc_ci"] = intervals["auc"]
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), curve_points)).round().astype(int))
    result.update(fpr=[round(float(x), 4) for x in fpr[keep]], tpr=[round(float(x), 4) for x in tpr[keep]])
    return result


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}pct".replace(".", "_")


def _bootstrap_intervals(members: np.ndarray, others: np.ndarray, resamples: int, seed: int) -> dict[str, list[float]]:
    """95% percentile intervals, members and non-members resampled apart (their counts are fixed
    by the design). Each resample is a row of draw counts, and AUC and TPR at each FPR come from
    those counts in whole-array operations (the same draws as one `roc_curve` per resample, which
    took seconds per call at 1000 resamples)."""
    rng = np.random.default_rng(seed)
    n_m, n_o = len(members), len(others)
    counts_m, counts_o = np.empty((resamples, n_m)), np.empty((resamples, n_o))
    for b in range(resamples):  # one stream, members then non-members per resample
        counts_m[b] = np.bincount(rng.choice(n_m, n_m), minlength=n_m)
        counts_o[b] = np.bincount(rng.choice(n_o, n_o), minlength=n_o)
    # from here on, each side in ascending order of score
    order_m, order_o = np.argsort(members, kind="stable"), np.argsort(others, kind="stable")
    members, others, counts_m, counts_o = members[order_m], others[order_o], counts_m[:, order_m], counts_o[:, order_o]
    # Mann-Whitney: a member above a non-member counts 1, a tie 1/2
    wins = (members[:, None] > others[None, :]) + 0.5 * (members[:, None] == others[None, :])
    intervals = {"auc": ((counts_m @ wins) * counts_o).sum(axis=1) / (n_m * n_o)}
    # members at or above each member value, per resample (members sorted ascending)
    at_or_above_m = np.cumsum(counts_m[:, ::-1], axis=1)[:, ::-1]
    at_or_above_o = np.cumsum(counts_o[:, ::-1], axis=1)[:, ::-1]
    at_or_above_m = np.concatenate([at_or_above_m, np.zeros((resamples, 1))], axis=1)  # a threshold above every member: none
    for target in FPR_TARGETS:
        allowed = math.floor(target * n_o + 1e-9)  # non-members the threshold may let through
        if allowed >= n_o:
            tpr = np.ones(resamples)
        else:
            # the (allowed+1)-th highest non-member: the threshold must sit strictly above it
            position = (at_or_above_o >= allowed + 1).sum(axis=1) - 1
            cut = others[position]
            first_above = np.searchsorted(members, cut, side="right")
            tpr = at_or_above_m[np.arange(resamples), first_above] / n_m
        intervals[f"tpr_at_{_pct(target)}_fpr"] = tpr
    return {key: [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)] for key, values in intervals.items()}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a rate."""
    return [round(bound, 4) for bound in _wilson(successes, trials, z)]


def _wilson(successes: int, trials: int, z: float) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(hits_a: int, trials_a: int, hits_b: int, trials_b: int, z: float = 1.96) -> list[float]:
    """95% interval of the difference of two independent rates, a - b: Newcombe's hybrid score
    interval (his method 10), built from each rate's Wilson interval; it keeps its coverage for
    small counts and rates near 0, where the Wald interval collapses to a point."""
    if not trials_a or not trials_b:
        return [-1.0, 1.0]
    p, q = hits_a / trials_a, hits_b / trials_b
    (l1, u1), (l2, u2) = _wilson(hits_a, trials_a, z), _wilson(hits_b, trials_b, z)
    lower = p - q - math.sqrt((p - l1) ** 2 + (u2 - q) ** 2)
    upper = p - q + math.sqrt((u1 - p) ** 2 + (q - l2) ** 2)
    return [round(max(-1.0, lower), 4), round(min(1.0, upper), 4)]


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


def one_run_audit(scores: list[float], included: list[bool], guesses: int, confidence: float = 0.95, delta: float = 0.0, in_only: bool = False) -> dict:
    """Guess "in" for the guesses/2 highest scores and "out" for the guesses/2 lowest, or with
    `in_only` "in" for the `guesses` highest, abstaining on the rest (Steinke et al. allow both);
    the bound holds for (epsilon, delta)-DP with the delta given (the canary unit's)."""
    if guesses < 2 or guesses > len(scores):
        raise ValueError(f"guesses must be between 2 and the {len(scores)} canaries, got {guesses}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    inside = guesses if in_only else guesses // 2
    guessed_in, guessed_out = order[:inside], order[len(order) - (guesses - inside):]
    correct = sum(included[i] for i in guessed_in) + sum(not included[i] for i in guessed_out)
    m, planted = len(scores), sum(included)
    # the most guesses this design can get right with the canaries drawn in: "in" is right at most
    # `planted` times and "out" at most m - planted (all `guesses` right only at an even split)
    best = min(inside, planted) + min(guesses - inside, m - planted)
    return {"canaries": m, "planted": planted, "guesses": guesses, "in_only": in_only, "correct": correct, "max_correct": best, "delta": delta,
            "epsilon_lower_bound": _floor4(epsilon_lower_bound(guesses, correct, confidence, m, delta)),
            "largest_certifiable": _floor4(epsilon_lower_bound(guesses, best, confidence, m, delta)), "confidence": confidence}


def _floor4(bound: float) -> float:
    """A lower bound to 4 decimals, rounded down: rounding to nearest could raise it past the claim."""
    return math.floor(bound * 1e4) / 1e4


IN_ONLY_SHARES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DECLARED_GUESSING = ('guesses "in" on the highest-scoring 5 to 50% of the canaries (abstaining on the rest) and, once, half "in" and half "out" on all of them, '
                     "Bonferroni-corrected")  # declared_guesses, in words for the report


def guess_counts(canaries: int, shares: tuple[float, ...] = IN_ONLY_SHARES) -> list[int]:
    """Numbers of guesses as shares of the canaries."""
    return sorted({max(2, min(canaries, round(share * canaries))) for share in shares})


def declared_guesses(canaries: int) -> list[tuple[int, bool]]:
    """The (number of guesses, in only) tried, declared before any score is seen: "in" on the
    highest-scoring 5 to 50% of the canaries, abstaining on the rest (training raises a planted
    canary's score, while not planting one does not lower it, so the low end says little), and a
    guess on every canary, half "in" and half "out"."""
    return [(n, True) for n in guess_counts(canaries)] + [(canaries, False)]


def one_run_audit_declared(scores: list[float], included: list[bool], declared: list[tuple[int, bool]], confidence: float = 0.95, delta: float = 0.0) -> dict:
    """The one-run audit for each declared way of guessing, each at confidence 1 - (1 - confidence)
    / len(declared) (Bonferroni), so the best of them still holds at `confidence`: an auditor who
    guesses only where the scores are extreme certifies more than one forced to guess on every
    canary, and trying several ways this way costs no validity."""
    each = 1 - (1 - confidence) / len(declared)
    tried = [one_run_audit(scores, included, r, each, delta, in_only) for r, in_only in declared]
    best = max(tried, key=lambda t: (t["epsilon_lower_bound"], t["guesses"]))  # on a tie, the count that looked at most canaries
    return {**best, "confidence": confidence, "confidence_each": round(each, 6), "largest_certifiable": max(t["largest_certifiable"] for t in tried),
            "tried": [{k: t[k] for k in ("guesses", "in_only", "correct", "epsilon_lower_bound")} for t in tried]}
