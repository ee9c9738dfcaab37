"""Every audit and benchmark metric on a small case computed by hand."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats

from eval import metrics
from eval.benchmarks import LETTERS, SENTIMENT, Item, parse_choice, score
from eval.fidelity import distinct_n, frechet_distance, self_bleu


def test_exact_exposure_is_log_space_minus_log_rank():
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.exposure_exact(1.0, losses) == pytest.approx(2.0)  # rank 1 of 4: log2 4
    assert metrics.exposure_exact(3.0, losses) == pytest.approx(2.0 - math.log2(3))
    assert metrics.exposure_exact(4.0, losses) == pytest.approx(0.0)
    # ties count against the canary (Carlini et al.: rank = |{r: loss(r) <= loss(own)}|)
    assert metrics.exposure_exact(5.0, np.full(100, 5.0)) == pytest.approx(0.0)
    assert metrics.exposure_exact(2.0, np.array([1.0, 2.0, 2.0, 3.0])) == pytest.approx(2.0 - math.log2(3))
    # a sample of candidates all at one loss cannot be fitted: its ranks are used, not a crash
    assert metrics.exposure_extrapolated(5.0, np.full(50, 5.0), 1e6) == pytest.approx(0.0)
    assert metrics.exposure_extrapolated(4.0, np.full(50, 5.0), 1e6) == pytest.approx(math.log2(51))


def test_extrapolated_exposure_reads_the_fitted_tail():
    rng = np.random.default_rng(0)
    sample = rng.normal(10.0, 2.0, size=5000)
    at_one_in_1024 = 10.0 + 2.0 * stats.norm.ppf(2.0**-10)
    assert metrics.exposure_extrapolated(at_one_in_1024, sample, 1e6) == pytest.approx(10.0, abs=0.6)
    assert metrics.exposure_extrapolated(-1e9, sample, 1e6) == pytest.approx(math.log2(1e6))  # capped at log2 |R|
    # a random unseen canary: rank uniform, exposure about 1/ln 2 = 1.44 on average, far below log2 |R|
    unseen = [metrics.exposure_extrapolated(x, sample, 1e6) for x in rng.normal(10.0, 2.0, size=400)]
    assert np.mean(unseen) == pytest.approx(1 / math.log(2), abs=0.25)


def test_membership_scores_by_hand():
    logprobs = np.array([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert metrics.score_loss(logprobs) == -3.0
    assert metrics.score_min_k(logprobs, k=0.4) == -4.5  # the 2 lowest of 5
    assert metrics.score_min_k_plus_plus(np.array([-1.0, -2.0]), np.array([-2.0, -2.0]), np.array([1.0, 0.5]), k=0.5) == 0.0  # standardised [1, 0]
    assert metrics.score_reference(np.array([-1.0, -1.0]), np.array([-3.0, -2.0])) == 1.5
    text = "the quarterly revenue rose sharply"
    assert metrics.score_zlib(logprobs, text) == pytest.approx(-15.0 / len(zlib.compress(text.encode())))


def test_roc_auc_and_tpr_at_low_fpr():
    assert metrics.roc([3, 4], [1, 2])["auc"] == 1.0
    assert metrics.roc([1, 3], [2, 4])["auc"] == 0.25  # of 4 member/non-member pairs, 1 ordered right
    separated = metrics.roc([10.0] * 5, list(np.linspace(0, 1, 200)))
    assert separated["tpr_at_1pct_fpr"] == 1.0
    # one non-member above every member: at FPR <= 1% (0 of 1 allowed... 1/1 > 1%) no member is caught
    assert metrics.roc([2.0, 3.0], [5.0])["tpr_at_1pct_fpr"] == 0.0


def test_one_run_lower_bound_by_hand():
    # 16 of 16 correct: P[Bin(16, p) >= 16] = p^16 = 0.05 at p = 0.05^(1/16); eps = log(p / (1 - p))
    p = 0.05 ** (1 / 16)
    assert metrics.epsilon_lower_bound(16, 16) == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
    assert metrics.epsilon_lower_bound(16, 8) == 0.0  # coin flips certify nothing
    eps = metrics.epsilon_lower_bound(100, 80)
    assert metrics.binomial_tail(100, 80, 1 / (1 + math.exp(-eps))) == pytest.approx(0.05, abs=1e-3)
    audit = metrics.one_run_audit([4.0, 3.0, 2.0, 1.0], [True, True, False, False], guesses=4)
    assert audit["correct"] == 4 and audit["largest_certifiable"] == pytest.approx(metrics.epsilon_lower_bound(4, 4), abs=1e-4)
    assert metrics.one_run_audit([1.0, 2.0, 3.0, 4.0], [True, True, False, False], guesses=4)["correct"] == 0
    # with one canary of four planted, half "in" and half "out" gets at most 3 right: the design's
    # ceiling is that, not all four (it had overstated what the audit could certify)
    one_planted = metrics.one_run_audit([4.0, 3.0, 2.0, 1.0], [True, False, False, False], guesses=4)
    assert one_planted["max_correct"] == 3 and one_planted["largest_certifiable"] == pytest.approx(metrics.epsilon_lower_bound(4, 3), abs=1e-4)
    assert metrics.one_run_audit([4.0, 3.0, 2.0, 1.0], [True, False, False, False], guesses=2, in_only=True)["max_correct"] == 1


def test_declared_guesses_are_bonferroni_corrected():
    # 200 canaries, the 20 highest planted and the 20 lowest not, the rest at random: guessing "in"
    # only on the top certifies more than guessing on all, and the best of the declared ways is
    # still judged at 95% overall (each at 1 - 0.05/7)
    rng = np.random.default_rng(0)
    included = [True] * 20 + list(rng.random(160) < 0.5) + [False] * 20
    scores = list(np.linspace(10, 1, 200))
    declared = metrics.declared_guesses(200)
    assert declared == [(10, True), (20, True), (40, True), (60, True), (80, True), (100, True), (200, False)]
    audit = metrics.one_run_audit_declared(scores, included, declared)
    assert audit["guesses"] == 20 and audit["in_only"] and audit["correct"] == 20 and audit["confidence_each"] == pytest.approx(1 - 0.05 / 7)
    assert audit["epsilon_lower_bound"] == pytest.approx(metrics.epsilon_lower_bound(20, 20, 1 - 0.05 / 7, 200), abs=1e-4)
    assert audit["epsilon_lower_bound"] < metrics.epsilon_lower_bound(20, 20, 0.95, 200)  # the correction costs something
    everything = metrics.one_run_audit(scores, included, 200)
    assert audit["epsilon_lower_bound"] > everything["epsilon_lower_bound"] and not everything["in_only"]
    assert len(audit["tried"]) == 7
    # "in" only: the 40 guesses are the 40 highest scores, none of the lowest
    assert metrics.one_run_audit(scores, included, 40, in_only=True)["correct"] == 20 + sum(included[20:40])


def test_one_declared_number_of_in_guesses_is_judged_at_95_percent_alone():
    """`ksg audit --in-guesses N`: "in" on the N highest scores, the only way tried, so no
    Bonferroni correction; on the same scores it certifies more than the seven default tries."""
    from eval.audit import AuditOptions, one_run

    rng = np.random.default_rng(1)
    included = [True] * 120 + list(rng.random(480) < 0.45)
    scores = list(np.linspace(10, 1, 600))
    declared = one_run(scores, included, AuditOptions(in_guesses=120), 1e-5)
    default = one_run(scores, included, AuditOptions(), 1e-5)
    assert declared["guesses"] == 120 and declared["in_only"] and declared["correct"] == 120 and len(declared["tried"]) == 1
    assert declared["confidence_each"] == pytest.approx(0.95)
    assert declared["epsilon_lower_bound"] == pytest.approx(metrics.epsilon_lower_bound(120, 120, 0.95, 600, 1e-5), abs=1e-4)
    assert declared["epsilon_lower_bound"] > default["epsilon_lower_bound"] + 0.4  # 3.66 against 3.12
    with pytest.raises(ValueError, match="declare one"):
        AuditOptions(in_guesses=120, guesses=120)


def test_tpr_at_low_fpr_with_intervals_and_rmia_by_hand():
    rng = np.random.default_rng(0)
    members, others = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
    result = metrics.roc(list(members), list(others), bootstrap=200, seed=1)
    assert result["auc_ci"][0] < result["auc"] < result["auc_ci"][1]
    assert result["tpr_at_1pct_fpr_ci"][0] <= result["tpr_at_1pct_fpr"] <= result["tpr_at_1pct_fpr_ci"][1]
    assert result["tpr_at_1pct_fpr_measurable"] and not result["tpr_at_0_1pct_fpr_measurable"]  # 0.1% of 500 is half a record
    assert len(result["fpr"]) <= 201
    # p_target 0.5 on each token, p_ref 0.25: marginal ((1.3)(0.25) + 0.7) / 2 = 0.5125
    assert metrics.score_rmia(np.log([0.5, 0.5]), np.log([0.25, 0.25])) == pytest.approx(math.log(0.5 / 0.5125))
    assert metrics.wilson_interval(0, 100)[0] == 0.0 and metrics.wilson_interval(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)


def test_the_difference_of_two_rates_has_newcombes_hybrid_score_interval():
    """Newcombe (Statistics in Medicine 1998, 17:873-890), table II, method 10, examples (a), (b) and (h)."""
    assert metrics.difference_interval(56, 70, 48, 80) == pytest.approx([0.0524, 0.3339], abs=1e-4)
    assert metrics.difference_interval(9, 10, 3, 10) == pytest.approx([0.1705, 0.8090], abs=1e-4)
    assert metrics.difference_interval(0, 10, 0, 20) == pytest.approx([-0.1611, 0.2775], abs=1e-4)
    assert metrics.difference_interval(3, 10, 9, 10) == pytest.approx([-0.8090, -0.1705], abs=1e-4)  # the other way round


def test_fidelity_and_diversity_by_hand():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 3))
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # same covariance: ||shift||^2
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert self_bleu(["the bank raised its outlook today"] * 3) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four", "red green blue yellow"]) < 0.05


def test_benchmark_scoring_by_hand():
    items = [Item("q", SENTIMENT, a) for a in (0, 1, 2, 0)]
    result = score(items, [0, 1, 1, None])
    # class 0: P 1, R 1/2, F 2/3; class 1: P 1/2, R 1, F 2/3; class 2: F 0
    assert result.accuracy == 0.5 and result.macro_f1 == pytest.approx(4 / 9, abs=1e-4) and result.unparsed == 1
    assert result.predicted == {"negative": 1, "neutral": 2, "positive": 0} and result.truth == {"negative": 2, "neutral": 1, "positive": 1}
    # a class absent from both truth and answers (a seeded subset without "neutral") is no class missed
    perfect = score([Item("q", SENTIMENT, a) for a in (0, 2, 2)], [0, 2, 2])
    assert perfect.accuracy == 1.0 and perfect.macro_f1 == 1.0  # it had been 2/3
    # items offering more options later count them too (the first item had fixed k)
    later = score([Item("q", LETTERS[:2], 0), Item("q", LETTERS[:4], 3)], [0, 3])
    assert later.macro_f1 == 1.0 and later.truth == {"A": 1, "B": 0, "C": 0, "D": 1}
    assert parse_choice("The answer is B.", LETTERS) == 1
    assert parse_choice("positive, not negative", SENTIMENT) == 2
    assert parse_choice("Answer: about a dozen", LETTERS) is None  # 'a' inside words is not option A


def test_bootstrap_intervals_match_one_roc_curve_per_resample():
    """The whole-array bootstrap gives the intervals of the plain loop (sklearn's roc_curve and
    roc_auc_score on each resample, drawn from the same stream), ties included."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(5)
    for members, others in [(rng.normal(0.7, 1, 80), rng.normal(0, 1, 300)), (rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 150).astype(float))]:
        draws = np.random.default_rng(9)
        loop: dict[str, list[float]] = {"auc": [], "tpr_at_1pct_fpr": [], "tpr_at_0_1pct_fpr": []}
        labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
        for _ in range(150):
            scores = np.r_[draws.choice(members, len(members)), draws.choice(others, len(others))]
            fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
            loop["auc"].append(roc_auc_score(labels, scores))
            loop["tpr_at_1pct_fpr"].append(metrics.tpr_at_fpr(fpr, tpr, 0.01))
            loop["tpr_at_0_1pct_fpr"].append(metrics.tpr_at_fpr(fpr, tpr, 0.001))
        fast = metrics._bootstrap_intervals(members, others, 150, 9)
        for key, values in loop.items():
            assert fast[key] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)], abs=1e-4), key
