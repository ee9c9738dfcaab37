"""Each aggregation rule against a hand-computed reference (explicit numbers or plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knowledgesg import aggregation as agg

X = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
UPDATES = [{"w": np.array([1.0, 0.0]), "b": np.array([2.0])},
           {"w": np.array([3.0, 2.0]), "b": np.array([0.0])},
           {"w": np.array([-1.0, 4.0]), "b": np.array([1.0])}]
WEIGHTS = [1.0, 2.0, 1.0]


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)


def test_fedavg_weights_by_examples():
    # D_w = (1*[1,0] + 2*[3,2] + 1*[-1,4]) / 4 = [1.5, 2.0]; D_b = (2 + 0 + 1) / 4 = 0.75
    assert close(agg.fedavg(X, UPDATES, WEIGHTS), {"w": np.array([2.5, 4.0]), "b": np.array([1.25])})
    assert close(agg.fedavg(X, UPDATES, WEIGHTS, eta=0.5), {"w": np.array([1.75, 3.0]), "b": np.array([0.875])})


def test_fedavgm_accumulates_momentum_over_rounds():
    state = agg.ServerState()
    first = agg.fedavgm(X, UPDATES, WEIGHTS, state, beta=0.5)  # v = D
    second = agg.fedavgm(first, UPDATES, WEIGHTS, state, beta=0.5)  # v = 0.5 D + D = 1.5 D
    assert close(first, {"w": np.array([2.5, 4.0]), "b": np.array([1.25])})
    assert close(second, {"w": np.array([2.5 + 2.25, 4.0 + 3.0]), "b": np.array([1.25 + 1.125])})


@pytest.mark.parametrize("rule", ["fedadagrad", "fedyogi", "fedadam"])
def test_adaptive_rules_over_two_rounds(rule):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    state = agg.ServerState()
    x = {k: v.copy() for k, v in X.items()}
    d = {"w": [1.5, 2.0], "b": [0.75]}  # the weighted mean update, from the FedAvg test
    m = {"w": [0.0, 0.0], "b": [0.0]}
    v = {"w": [0.0, 0.0], "b": [0.0]}
    expected = {k: list(X[k]) for k in X}
    for _ in range(2):
        x = agg.fedopt(rule, x, UPDATES, WEIGHTS, state, eta=eta, beta1=b1, beta2=b2, tau=tau)
        for k in d:
            for i, g in enumerate(d[k]):
                m[k][i] = b1 * m[k][i] + (1 - b1) * g
                if rule == "fedadagrad":
                    v[k][i] = v[k][i] + g * g
                elif rule == "fedyogi":
                    v[k][i] = v[k][i] - (1 - b2) * g * g * math.copysign(1.0, v[k][i] - g * g) if v[k][i] != g * g else v[k][i]
                else:
                    v[k][i] = b2 * v[k][i] + (1 - b2) * g * g
                expected[k][i] += eta * m[k][i] / (math.sqrt(v[k][i]) + tau)
    assert close(x, {k: np.array(e) for k, e in expected.items()})
    with pytest.raises(ValueError, match="unknown adaptive rule"):
        agg.fedopt("fedsgd", X, UPDATES, WEIGHTS, agg.ServerState())


def test_scaffold_moves_x_and_the_control_variate():
    state = agg.ServerState()
    dcs = [{"w": np.array([0.3, 0.0]), "b": np.array([0.0])}, {"w": np.array([0.0, 0.6]), "b": np.array([0.3])}, {"w": np.array([0.0, 0.0]), "b": np.array([0.0])}]
    x = agg.scaffold(X, UPDATES, dcs, state, num_clients=6)
    # unweighted mean update: w = [1, 2], b = 1; c += (3/6) * mean(dc) = 0.5 * [0.1, 0.2], 0.5 * 0.1
    assert close(x, {"w": np.array([2.0, 4.0]), "b": np.array([1.5])})
    assert close(state.c, {"w": np.array([0.05, 0.1]), "b": np.array([0.05])})


def test_coordinate_median_and_trimmed_mean_ignore_an_outlier():
    evil = UPDATES + [{"w": np.array([100.0, -100.0]), "b": np.array([50.0])}]
    # per coordinate, sorted: w0 [-1, 1, 3, 100] -> median 2; w1 [-100, 0, 2, 4] -> 1; b [0, 1, 2, 50] -> 1.5
    assert close(agg.coordinate_median(X, evil), {"w": np.array([3.0, 3.0]), "b": np.array([2.0])})
    # trim 1 each side: w0 mean(1, 3) = 2; w1 mean(0, 2) = 1; b mean(1, 2) = 1.5
    assert close(agg.trimmed_mean(X, evil, trim=1), {"w": np.array([3.0, 3.0]), "b": np.array([2.0])})
    with pytest.raises(ValueError, match="cannot drop 2 from each side of 4"):
        agg.trimmed_mean(X, evil, trim=2)


def test_krum_selects_the_update_closest_to_its_neighbours():
    honest = [{"w": np.array([1.0, 1.0])}, {"w": np.array([1.2, 0.9])}, {"w": np.array([0.9, 1.1])}, {"w": np.array([1.1, 1.0])}]
    evil = [{"w": np.array([9.0, -9.0])}]
    updates = honest + evil
    # reference: score_i = sum of the n - f - 2 = 2 smallest squared distances to the others
    flat = [u["w"] for u in updates]
    scores = [sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(5) if j != i)[:2] for i in range(5)]
    best = int(np.argmin([sum(s) for s in scores]))
    assert agg.krum_index(updates, byzantine=1) == best and best != 4
    assert close(agg.krum({"w": np.zeros(2)}, updates, byzantine=1), updates[best])
    with pytest.raises(ValueError, match="Krum needs"):
        agg.krum_index(updates[:3], byzantine=1)


def _gaussian(seed: int):
    rng = np.random.default_rng(seed)
    return lambda shape, std: rng.normal(0.0, std, size=shape)


def test_dp_fedavg_sums_clipped_updates_and_divides_by_the_expected_count():
    updates = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.3, 0.4])}]  # norms 5 and 0.5
    clipped = [agg.clip_update(u, 1.0) for u in updates]  # what each client does before sending
    assert close(clipped[0], {"w": np.array([0.6, 0.8])}) and close(clipped[1], updates[1])
    no_noise = agg.dp_fedavg({"w": np.zeros(2)}, clipped, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0, noise=_gaussian(0))
    assert close(no_noise, {"w": np.array([0.225, 0.3])})  # sum [0.9, 1.2] / 4
    x0 = {"w": np.zeros(20_000)}
    noisy = agg.dp_fedavg(x0, [{"w": np.zeros(20_000)}], clip_norm=2.0, noise_multiplier=1.5, expected_clients=10.0, noise=_gaussian(1))
    assert float(noisy["w"].std()) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.03)


def test_dp_fedavg_refuses_an_update_the_client_did_not_clip():
    with pytest.raises(ValueError, match="exceeds the clip norm 1.0: clients clip before sending"):
        agg.dp_fedavg({"w": np.zeros(2)}, [{"w": np.array([3.0, 4.0])}], clip_norm=1.0, noise_multiplier=1.0, expected_clients=1.0, noise=_gaussian(0))


def test_empty_or_weightless_rounds_are_refused():
    with pytest.raises(ValueError, match="at least one update"):
        agg.fedavg(X, [], [])
    with pytest.raises(ValueError, match="at least one update"):
        agg.fedavg(X, UPDATES, [0.0, 0.0, 0.0])
