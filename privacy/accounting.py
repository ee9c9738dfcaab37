"""Privacy accounting: mechanisms as data, epsilons from three accountants, noise calibration.

Pure functions over `Mechanism` records, no training code. The reported epsilon of a release is
PRV (Gopi et al. 2021, via Opacus), falling back to RDP when PRV fails numerically; RDP and PLD
(Google's dp-accounting) are computed for the same mechanism and shown beside it. A client's
total over heterogeneous releases is composed with PLD.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from knowledgesg.errors import InputError, SpecError


# A noise multiplier a spec may set. Below 0.3 the release is private in name only (epsilon about 70
# at q 0.01 over 1,000 steps already) and the accountants' numerics give out (at 0.05 the PLD
# accountant asked for 26 GiB; at 0.1 it ran for minutes); 1e300 overflowed them.
NOISE_MULTIPLIER_RANGE = {"ge": 0.3, "le": 1e4}

class Mechanism(BaseModel):
    """One released mechanism, composed `steps` times.

    poisson_gaussian: DP-SGD (Poisson sampling at `sample_rate`, Gaussian noise sigma * C).
    gaussian: the Gaussian mechanism (noise std = sigma * sensitivity), e.g. a DP histogram.
    post_processing: a function of earlier releases only: free.
    non_private: no guarantee at all (epsilon is infinite).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["poisson_gaussian", "gaussian", "post_processing", "non_private"]
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int = 1

    def history(self) -> list[tuple[float, float, int]]:
        """Opacus accountant history entries: (sigma, q, steps)."""
        if self.kind == "poisson_gaussian":
            return [(self.noise_multiplier, self.sample_rate, self.steps)]
        if self.kind == "gaussian":
            return [(self.noise_multiplier, 1.0, self.steps)]
        return []

    def dp_event(self):
        import dp_accounting

        if self.kind == "non_private":
            return dp_accounting.NonPrivateDpEvent()
        if self.kind == "post_processing" or self.steps == 0:
            return dp_accounting.NoOpDpEvent()
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        single = dp_accounting.PoissonSampledDpEvent(self.sample_rate, gaussian) if self.kind == "poisson_gaussian" else gaussian
        return dp_accounting.SelfComposedDpEvent(single, self.steps)


class Epsilons(BaseModel):
    """Epsilon at one delta by each accountant; `reported` is the figure we stand behind."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # the non-private reference: Infinity

    delta: float
    prv: float | None
    rdp: float
    pld: float
    reported: float
    reported_by: Literal["prv", "rdp", "pld", "none"]


def _quiet_absl() -> None:
    # dp-accounting logs a warning per RDP order it drops for non-convergence; the bound stays valid.
    logging.getLogger("absl").setLevel(logging.ERROR)


def epsilon_rdp(mechanisms: list[Mechanism], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    _quiet_absl()
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([m.dp_event() for m in mechanisms]))
    return float(accountant.get_epsilon(delta))


# The PLD accountant's grid of privacy-loss values. It discretises pessimistically (dp-accounting's
# default), so any grid gives an upper bound, looser the coarser it is and the more steps it
# composes: at 1e-3 against 1e-4, about 1.2e-6 x steps looser in epsilon, for 8-10x less time
# (pld_grid.md). A grid of at most 1/steps keeps that under about 0.001 up to 10,000 steps, and
# never finer than the 1e-4 every composition used before; at 1e-4 a demo bank's three PLD
# compositions (plan, budget check, release) took about 3 s of its dp_train.
COARSEST_PLD_GRID = 1e-3
FINEST_PLD_GRID = 1e-4


def pld_grid(mechanisms: list[Mechanism]) -> float:
    """The PLD grid for composing `mechanisms`: 1e-3, finer beyond 1,000 steps in all, down to 1e-4."""
    return max(FINEST_PLD_GRID, min(COARSEST_PLD_GRID, 1.0 / max(1, sum(m.steps for m in mechanisms))))


def _pld_epsilon(events: list, mechanisms: list[Mechanism], delta: float, discretization: float | None) -> float:
    """Epsilon at `delta` of the composed DP `events` (those of `mechanisms`, or of a group of their
    units) by PLD, on `discretization` or the grid `pld_grid` picks for `mechanisms`."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=pld_grid(mechanisms) if discretization is None else discretization)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def epsilon_pld(mechanisms: list[Mechanism], delta: float, discretization: float | None = None) -> float:
    """PLD upper bound (pessimistic discretisation: a coarser grid is faster and only looser)."""
    if any(m.kind == "non_private" for m in mechanisms):
        return math.inf
    return _pld_epsilon([m.dp_event() for m in mechanisms], mechanisms, delta, discretization)


def epsilon_prv(mechanisms: list[Mechanism], delta: float) -> float:
    """PRV upper bound; raises when it cannot be computed (the caller falls back to RDP)."""
    from opacus.accountants import PRVAccountant

    if any(m.kind == "non_private" for m in mechanisms):
        return math.inf
    history = [entry for m in mechanisms for entry in m.history() if entry[2] > 0]
    if not history:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(accountant.get_epsilon(delta, eps_error=0.01))
    if not math.isfinite(value) or value < 0:
        raise ArithmeticError(f"PRV returned {value}")
    return value


def epsilon_prv_or_none(mechanisms: list[Mechanism], delta: float) -> float | None:
    """PRV, or None where it fails numerically (callers then report RDP or PLD)."""
    try:
        return epsilon_prv(mechanisms, delta)
    except (ArithmeticError, ValueError, RuntimeError, IndexError):
        return None


def epsilons(mechanisms: list[Mechanism], delta: float) -> Epsilons:
    return _epsilons(tuple(mechanisms), delta).model_copy()


@functools.lru_cache(maxsize=256)
def _epsilons(mechanisms_tuple: tuple[Mechanism, ...], delta: float) -> Epsilons:
    """Cached: the three accountants cost seconds, and planning, release and report ask for the same mechanism."""
    mechanisms = list(mechanisms_tuple)
    rdp, pld = epsilon_rdp(mechanisms, delta), epsilon_pld(mechanisms, delta)
    prv = epsilon_prv_or_none(mechanisms, delta)
    if all(m.kind in ("post_processing",) or m.steps == 0 for m in mechanisms):
        return Epsilons(delta=delta, prv=0.0, rdp=0.0, pld=0.0, reported=0.0, reported_by="none")
    if any(m.kind == "non_private" for m in mechanisms):
        return Epsilons(delta=delta, prv=math.inf, rdp=math.inf, pld=math.inf, reported=math.inf, reported_by="none")
    reported, by = (prv, "prv") if prv is not None else (rdp, "rdp")
    return Epsilons(delta=delta, prv=prv, rdp=rdp, pld=pld, reported=reported, reported_by=by)


MAX_DEFAULT_DELTA = 1e-5


class RunningEpsilon:
    """Epsilon after k steps of one DP-SGD mechanism by RDP, for progress display: the one-step RDP
    curve is computed once, so each call is a few array operations (RDP bounds the PRV figure
    the release will report from above)."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        from opacus.accountants.analysis import rdp
        from opacus.accountants.rdp import RDPAccountant

        self.orders = RDPAccountant.DEFAULT_ALPHAS
        self.delta = delta
        self.one_step = rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=self.orders)

    def __call__(self, steps: int) -> float:
        from opacus.accountants.analysis import rdp

        return float(rdp.get_privacy_spent(orders=self.orders, rdp=self.one_step * steps, delta=self.delta)[0])


def default_delta(num_units: int) -> float:
    """At most 1e-5 and at most 1/(100 N), rounded down to a power of ten.

    A delta near 1/N allows a mechanism that publishes one whole unit with that probability
    ("How to DP-fy ML", Ponomareva et al. 2023, asks for delta much smaller than 1/N). The power
    of ten keeps the default from spelling out N exactly.
    """
    return min(MAX_DEFAULT_DELTA, 10.0 ** -math.ceil(math.log10(100 * max(1, num_units))))


def check_delta(delta: float, num_units: int, unit: str, client_id: str | None = None) -> None:
    """A spec's delta against a client's N (the spec's key: its file is named by the command)."""
    if not 0 < delta < 1.0 / num_units:
        whose = f" of client '{client_id}'" if client_id else ""
        raise SpecError(f"privacy.delta: {delta:g} is not below 1/N = {1.0 / num_units:g} for the N = {num_units} {unit}s{whose}: "
                        f"at that delta a mechanism may publish a {unit} outright; use at most {default_delta(num_units):g}")


def group_dp_event(mechanism: Mechanism, size: int):
    """The DP event of `mechanism` for neighbours that differ in `size` units (group privacy).

    DP-SGD with Poisson sampling: each of the k units joins a step independently with rate q, so
    the noisy sum moves by j C with probability Binomial(j; k, q): a mixture-of-Gaussians
    mechanism, whose PLD gives tight group-level guarantees (Ganesh 2024, "Tight group-level DP
    guarantees for DP-SGD with sampling via mixture of Gaussians mechanisms"; dp-accounting's
    MixtureOfGaussiansDpEvent). The Gaussian mechanism (no sampling) has sensitivity k s, i.e.
    noise multiplier sigma / k. The generic (k epsilon, k e^((k-1) epsilon) delta) conversion
    would be vacuous at epsilon 8.
    """
    import dp_accounting
    from dp_accounting import dp_event
    from scipy import stats

    if size < 1:
        raise ValueError(f"a group has at least one unit, got {size}")
    if size == 1 or mechanism.kind in ("post_processing", "non_private") or mechanism.steps == 0:
        return mechanism.dp_event()
    if mechanism.kind == "gaussian":
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(mechanism.noise_multiplier / size), mechanism.steps)
    weights = [float(stats.binom.pmf(j, size, mechanism.sample_rate)) for j in range(size + 1)]
    mixture = dp_event.MixtureOfGaussiansDpEvent(mechanism.noise_multiplier, [float(j) for j in range(size + 1)], weights)
    return dp_accounting.SelfComposedDpEvent(mixture, mechanism.steps)


def group_epsilon(mechanisms: list[Mechanism], size: int, delta: float, discretization: float | None = None) -> float:
    """Epsilon at `delta` for a group of `size` units over the composed releases (PLD, pessimistic grid)."""
    if any(m.kind == "non_private" for m in mechanisms):
        return math.inf
    if all(m.kind == "post_processing" or m.steps == 0 for m in mechanisms):
        return 0.0
    return _pld_epsilon([group_dp_event(m, size) for m in mechanisms], mechanisms, delta, discretization)


# a noise multiplier above this reaches no budget a user means: the target is too low
MAX_NOISE_MULTIPLIER = 1e6
# where the search starts, as Opacus's does: above every noise a budget users set needs, so the
# accountant is never asked about a sigma far below the answer (PRV at sigma 1, q 0.9, 10,000
# steps fills memory: its domain grows with the epsilon)
START_NOISE_MULTIPLIER = 20.0
DESCENT_STEP = 4.0
MAX_SEARCH_STEPS = 60


class BudgetTooLow(ValueError):
    pass


def smallest_noise_multiplier(epsilon_at: Callable[[float], float], target: float, tolerance: float) -> float:
    """The noise multiplier whose epsilon (`epsilon_at`, decreasing in it) is at most `target` and
    within `tolerance` of it. From START_NOISE_MULTIPLIER down (or doubling up), each step to
    where epsilon would reach the target if it went as 1/sigma, at most DESCENT_STEP lower; then
    regula falsi in 1/sigma, where epsilon is nearly linear (Illinois: an end kept twice has its
    weight halved). About 8 accountant calls where Opacus's bisection from [0, 20] made 11 to 16:
    1.8x faster over ten budgets (noise_calibration.md). Every candidate is judged by the
    accountant: the answer's epsilon was computed, never interpolated. After MAX_SEARCH_STEPS
    calls the noisiest sigma judged within the budget is the answer (more noise than needed,
    never less). An epsilon that is not a number raises ArithmeticError (the caller then tries
    another accountant): `eps > target` is False for NaN, which would pass it as within budget."""
    calls = 0

    def judged(sigma: float) -> float:
        nonlocal calls
        calls += 1
        eps = epsilon_at(sigma)
        if math.isnan(eps):
            raise ArithmeticError(f"the accountant gave epsilon NaN at noise multiplier {sigma:g}")
        return eps

    sigma, low, eps_low = START_NOISE_MULTIPLIER, 0.0, math.inf
    while (eps := judged(sigma)) > target:
        low, eps_low = sigma, eps
        sigma *= 2
        if sigma > MAX_NOISE_MULTIPLIER:
            raise BudgetTooLow(target)
    high, eps_high = sigma, eps
    while low == 0.0 and target - eps_high > tolerance:
        if calls >= MAX_SEARCH_STEPS:  # epsilon near 0 at every sigma: no bracket below
            raise ArithmeticError(f"no noise multiplier below {high:g} gives epsilon above {target:g}")
        sigma = max(high * eps_high / target, high / DESCENT_STEP)
        if (eps := judged(sigma)) > target:
            low, eps_low = sigma, eps
        else:
            high, eps_high = sigma, eps
    weight_low, weight_high, kept = eps_low - target, eps_high - target, 0
    while target - eps_high > tolerance and calls < MAX_SEARCH_STEPS:  # the accountant's own error can make epsilon wobble
        u = (weight_high / low - weight_low / high) / (weight_high - weight_low)  # the line's root, in 1/sigma
        sigma = 1 / u if low < 1 / u < high else (low + high) / 2
        if (eps := judged(sigma)) > target:
            low, weight_low = sigma, eps - target
            weight_high = weight_high / 2 if kept == 1 else weight_high
            kept = 1
        else:
            high, eps_high, weight_high = sigma, eps, eps - target
            weight_low = weight_low / 2 if kept == -1 else weight_low
            kept = -1
    return high


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, setting: str = "privacy.target_epsilon") -> tuple[float, str]:
    """The smallest noise multiplier whose epsilon is at most the target, and within 0.5% of it
    (cached: a search over the PRV accountant costs a second; `ksg check` and the run ask alike).
    `setting`: the spec key the target came from, for the errors."""
    from opacus.accountants import create_accountant

    if not target_epsilon > 0:
        raise InputError(f"{setting} must be > 0, got {target_epsilon}")
    for name in ("prv", "rdp"):
        accountant = create_accountant(mechanism=name)

        def epsilon_at(sigma: float) -> float:
            accountant.history = [(sigma, sample_rate, steps)]
            return accountant.get_epsilon(delta=delta, **({"eps_error": 0.01} if name == "prv" else {}))

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(smallest_noise_multiplier(epsilon_at, target_epsilon, 0.005 * target_epsilon)), name
        except BudgetTooLow:
            raise InputError(f"{setting} = {target_epsilon:g} cannot be reached at delta {delta:g} with {steps} steps at sampling rate {sample_rate:.4g}: the budget is too low") from None
        except (ArithmeticError, RuntimeError, IndexError, ValueError):
            continue
    raise InputError(f"{setting}: could not calibrate noise for epsilon {target_epsilon:g} (q={sample_rate:.4g}, steps={steps}): neither the PRV nor the RDP "
                     "accountant gave a usable epsilon")
