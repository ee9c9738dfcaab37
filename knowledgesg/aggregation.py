"""Server-side aggregation rules for federated tuning, as pure functions on parameter dicts.

Notation: x is the global model, the sampled clients return updates d_i = x_i - x with weights
n_i (their example counts), and D = sum_i n_i d_i / sum_i n_i is the weighted mean update.

- FedAvg (McMahan et al. 2017):   x <- x + eta * D                          (eta = 1: plain averaging)
- FedProx (Li et al. 2020):       aggregated as FedAvg; its proximal term mu/2 ||w - x||^2 is
                                  added to each client's local loss, not here.
- FedAvgM (Hsu et al. 2019):      v <- beta v + D;  x <- x + eta v
- FedAdagrad, FedYogi, FedAdam (Reddi et al. 2021), with m <- beta1 m + (1 - beta1) D, then
    FedAdagrad: v <- v + D^2
    FedYogi:    v <- v - (1 - beta2) D^2 sign(v - D^2)
    FedAdam:    v <- beta2 v + (1 - beta2) D^2
  and x <- x + eta m / (sqrt(v) + tau).
- SCAFFOLD (Karimireddy et al. 2020): x <- x + eta D (unweighted mean over sampled clients), and
  the server control variate c <- c + (|S| / N) mean_i(dc_i); clients correct their local steps
  with (c - c_i).
- Robust: coordinate-wise median; trimmed mean (drop the `trim` largest and smallest values of
  each coordinate); Krum (Blanchard et al. 2017): the update with the least sum of squared
  distances to its n - f - 2 nearest others.
- Client-level DP-FedAvg (McMahan et al. 2018): each update clipped to L2 norm S (by the client
  before it sends it; the server checks), summed, N(0, (sigma S)^2) added per coordinate, divided
  by the *expected* number of clients q N (fixed, so the sensitivity is S / (q N)). Accounting:
  Poisson sampling at q (each client's own coin), `rounds` compositions. With secure aggregation
  the server gets the sum only (`dp_fedavg_sum`); the rules that need single updates (SCAFFOLD,
  the robust ones) are then unavailable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Params = dict[str, np.ndarray]


def weighted_mean(updates: list[Params], weights: list[float]) -> Params:
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("aggregation needs at least one update with positive weight")
    return {name: sum(w * u[name] for u, w in zip(updates, weights)) / total for name in updates[0]}


def apply(x: Params, step: Params, eta: float = 1.0) -> Params:
    return {name: x[name] + eta * step[name] for name in x}


@dataclass
class ServerState:
    """Optimizer state the adaptive rules keep between rounds (moments, control variate)."""

    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)
    c: Params = field(default_factory=dict)


def fedavg(x: Params, updates: list[Params], weights: list[float], eta: float = 1.0) -> Params:
    return apply(x, weighted_mean(updates, weights), eta)


def fedavgm(x: Params, updates: list[Params], weights: list[float], state: ServerState, eta: float = 1.0, beta: float = 0.9) -> Params:
    mean = weighted_mean(updates, weights)
    state.v = {n: beta * state.v.get(n, 0.0) + mean[n] for n in mean}
    return apply(x, state.v, eta)


def fedopt(rule: str, x: Params, updates: list[Params], weights: list[float], state: ServerState,
           eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Params:
    """FedAdagrad, FedYogi or FedAdam: an adaptive optimizer on the server, the mean update as its gradient."""
    mean = weighted_mean(updates, weights)
    state.m = {n: beta1 * state.m.get(n, 0.0) + (1 - beta1) * mean[n] for n in mean}
    square = {n: mean[n] ** 2 for n in mean}
    if rule == "fedadagrad":
        state.v = {n: state.v.get(n, 0.0) + square[n] for n in mean}
    elif rule == "fedyogi":
        state.v = {n: state.v.get(n, 0.0) - (1 - beta2) * square[n] * np.sign(state.v.get(n, 0.0) - square[n]) for n in mean}
    elif rule == "fedadam":
        state.v = {n: beta2 * state.v.get(n, 0.0) + (1 - beta2) * square[n] for n in mean}
    else:
        raise ValueError(f"unknown adaptive rule '{rule}' (fedadagrad, fedyogi, fedadam)")
    return {n: x[n] + eta * state.m[n] / (np.sqrt(state.v[n]) + tau) for n in x}


def scaffold(x: Params, updates: list[Params], control_deltas: list[Params], state: ServerState, num_clients: int, eta: float = 1.0) -> Params:
    mean = weighted_mean(updates, [1.0] * len(updates))
    mean_dc = weighted_mean(control_deltas, [1.0] * len(control_deltas))
    share = len(updates) / num_clients
    state.c = {n: state.c.get(n, 0.0) + share * mean_dc[n] for n in mean_dc}
    return apply(x, mean, eta)


def _stacked(updates: list[Params], name: str) -> np.ndarray:
    return np.stack([u[name] for u in updates])


def coordinate_median(x: Params, updates: list[Params]) -> Params:
    return apply(x, {n: np.median(_stacked(updates, n), axis=0) for n in x})


def trimmed_mean(x: Params, updates: list[Params], trim: int) -> Params:
    if not 0 <= 2 * trim < len(updates):
        raise ValueError(f"trimmed mean: cannot drop {trim} from each side of {len(updates)} updates")
    return apply(x, {n: np.sort(_stacked(updates, n), axis=0)[trim : len(updates) - trim].mean(axis=0) for n in x})


def flatten(update: Params) -> np.ndarray:
    return np.concatenate([update[n].ravel() for n in sorted(update)])


def krum_index(updates: list[Params], byzantine: int) -> int:
    """The index of the update Krum selects, tolerating `byzantine` malicious clients."""
    n = len(updates)
    if n - byzantine - 2 < 1:
        raise ValueError(f"Krum needs n - f - 2 >= 1 (n = {n}, f = {byzantine})")
    flat = np.stack([flatten(u) for u in updates])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=-1)
    scores = [np.sort(np.delete(distances[i], i))[: n - byzantine - 2].sum() for i in range(n)]
    return int(np.argmin(scores))


def krum(x: Params, updates: list[Params], byzantine: int) -> Params:
    return apply(x, updates[krum_index(updates, byzantine)])


def clip_update(update: Params, max_norm: float) -> Params:
    norm = float(np.linalg.norm(flatten(update)))
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {n: v * scale for n, v in update.items()}


def update_norm(update: Params) -> float:
    return float(np.linalg.norm(flatten(update)))


def dp_fedavg(x: Params, clipped: list[Params], clip_norm: float, noise_multiplier: float, expected_clients: float,
              noise: Callable[[tuple[int, ...], float], np.ndarray]) -> Params:
    """Client-level DP: the sum of clipped updates plus Gaussian noise from `noise(shape, std)`,
    over the expected (not actual) client count. Refuses an update above the clip norm."""
    for update in clipped:
        if update_norm(update) > clip_norm * (1 + 1e-5):
            raise ValueError(f"an update of norm {update_norm(update):.6g} exceeds the clip norm {clip_norm}: clients clip before sending")
    total = {name: sum((c[name].astype(np.float64) for c in clipped), np.zeros(x[name].shape)) for name in x}
    return dp_fedavg_sum(x, total, clip_norm, noise_multiplier, expected_clients, noise)


def dp_fedavg_sum(x: Params, total: Params, clip_norm: float, noise_multiplier: float, expected_clients: float,
                  noise: Callable[[tuple[int, ...], float], np.ndarray]) -> Params:
    """Client-level DP from the sum of the clipped updates alone (what secure aggregation gives
    the server): the same noise and scaling as `dp_fedavg`; the server cannot check each update's
    norm here, the clients' clipping is what bounds it."""
    step = {name: (np.asarray(total[name], dtype=np.float64) + noise(x[name].shape, noise_multiplier * clip_norm)) / expected_clients for name in x}
    return apply(x, step)
