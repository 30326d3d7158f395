"""Privacy accounting: every epsilon the system prints comes from here.

Gaussian mechanisms (DP-SGD on devices, central DP) are accounted with
Opacus's own accountants: RDP (Mironov 2017; Mironov, Talwar, Zhang 2019
for the sampled Gaussian) or PRV (Gopi, Lee, Wutschitz 2021). The Skellam
mechanism (integer noise for secure aggregation) is accounted with the RDP
bound of Agarwal, Kairouz and Liu (NeurIPS 2021, Theorem 3.5): for noise of
variance mu per coordinate and sensitivities Delta_1, Delta_2 (integer units),

    eps(alpha) <= alpha Delta_2^2 / (2 mu)
                  + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu))

whose first term is exactly the Gaussian RDP with sigma^2 = mu, so it
approaches the Gaussian accountant as the variance grows. Composition over
steps multiplies RDP by the number of steps. Sampling amplification is
applied to the Gaussian only; for Skellam we do not claim any (a
conservative choice: the sampled-Skellam bound needs the general subsampled
RDP machinery), which `estimate` states in its output.
"""

from __future__ import annotations

import enum
import functools
import importlib.machinery
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "AccountantKind",
    "Mechanism",
    "PrivacyEstimate",
    "Spend",
    "epsilon_of",
    "estimate",
    "gaussian_epsilon",
    "noise_for_epsilon",
    "privacy_status",
    "rdp_of",
    "skellam_epsilon",
    "skellam_rdp",
]

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128.0, 256.0, 512.0]
)


class Mechanism(enum.StrEnum):
    GAUSSIAN = "gaussian"
    SKELLAM = "skellam"


def privacy_status(epsilon: float) -> str:
    """The words every report uses: strong at epsilon <= 1, moderate <= 8, weak above."""
    if epsilon <= 1.0:
        return "strong"
    if epsilon <= 8.0:
        return "moderate"
    return "weak"


class AccountantKind(enum.StrEnum):
    RDP = "rdp"
    PRV = "prv"


@dataclass(frozen=True)
class PrivacyEstimate:
    epsilon: float
    delta: float
    mechanism: Mechanism
    accountant: AccountantKind
    noise_multiplier: float
    sample_rate: float
    steps: int
    note: str = ""


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if noise_multiplier <= 0:
        raise ValueError("noise multiplier must be positive")
    if not 0 < sample_rate <= 1:
        raise ValueError("sample rate must be in (0, 1]")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")


@functools.cache
def _opacus_rdp() -> Any:
    """Opacus's RDP analysis (`opacus.accountants.analysis.rdp`), without Opacus's training stack.

    Importing it the usual way runs `opacus/__init__`, which imports torch and the
    privacy engine: about 4 s of start-up for `xeno-fl privacy estimate` and for the
    server's first ledger entry, which need only this module's numpy/scipy functions.
    It is the installed file itself, loaded on its own; a process that already has
    Opacus imported (a device) uses that module.
    """
    name = "opacus.accountants.analysis.rdp"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("opacus")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed; its RDP analysis is Xeno FL's accountant")
    package = Path(next(iter(spec.submodule_search_locations)))
    path = package / "accountants" / "analysis" / "rdp.py"
    loader = importlib.machinery.SourceFileLoader("xeno_opacus_rdp", str(path))
    module: ModuleType = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(loader.name, loader)  # type: ignore[arg-type]
    )
    loader.exec_module(module)
    return module


def gaussian_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """Epsilon of `steps` compositions of the sampled Gaussian mechanism (Opacus accountants)."""
    _check(noise_multiplier, sample_rate, steps, delta)
    kind = AccountantKind(accountant)
    if kind is AccountantKind.RDP:
        # What Opacus's RDPAccountant computes for this history, from its analysis module.
        rdp = _opacus_rdp().compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            orders=list(DEFAULT_ORDERS),
        )
        return rdp_to_epsilon(DEFAULT_ORDERS, np.asarray(rdp, dtype=np.float64), delta)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """Smallest Gaussian noise multiplier whose epsilon is at most target_epsilon (bisection)."""
    return _smallest_noise(
        lambda z: gaussian_epsilon(z, sample_rate, steps, delta, accountant), target_epsilon
    )


def _smallest_noise(epsilon_at: Callable[[float], float], target_epsilon: float) -> float:
    """Bisect for the smallest noise multiplier z with epsilon_at(z) <= target (to 1e-4 z)."""
    if target_epsilon <= 0:
        raise ValueError("target epsilon must be positive")
    low, high = 1e-3, 1.0
    while epsilon_at(high) > target_epsilon:
        high *= 2
        if high > 1e5:
            raise ValueError("target epsilon unreachable with any reasonable noise")
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        if epsilon_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def skellam_rdp(orders: Sequence[float], variance: float, l2: float, l1: float) -> np.ndarray:
    """RDP of one release of the Skellam mechanism (Agarwal et al. 2021, Thm 3.5)."""
    if variance <= 0 or l2 <= 0 or l1 <= 0:
        raise ValueError("variance and sensitivities must be positive")
    a = np.asarray(orders, dtype=np.float64)
    gaussian = a * l2**2 / (2 * variance)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    rdp: np.ndarray = gaussian + extra
    return rdp


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """The (epsilon, delta) conversion Opacus uses (Balle et al. 2020)."""
    eps, _ = _opacus_rdp().get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def skellam_epsilon(
    noise_multiplier: float, steps: int, delta: float, l2: float, dimension: int
) -> float:
    """Epsilon of `steps` Skellam releases with variance (noise_multiplier * l2)^2.

    l2 is the L2 sensitivity in integer (quantized) units; the L1 sensitivity
    of an integer vector is at most min(sqrt(d) l2, l2^2).
    """
    _check(noise_multiplier, 1.0, steps, delta)
    l1 = min(math.sqrt(dimension) * l2, l2**2)
    variance = (noise_multiplier * l2) ** 2
    rdp = steps * skellam_rdp(DEFAULT_ORDERS, variance, l2, l1)
    return rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta)


def estimate(
    mechanism: Mechanism | str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind | str = AccountantKind.RDP,
    l2_sensitivity: float = 2.0**16,
    dimension: int = 5258,
) -> PrivacyEstimate:
    kind = Mechanism(mechanism)
    acc = AccountantKind(accountant)
    if kind is Mechanism.GAUSSIAN:
        eps = gaussian_epsilon(noise_multiplier, sample_rate, steps, delta, acc)
        note = ""
    else:
        if acc is not AccountantKind.RDP:
            raise ValueError("the Skellam mechanism is accounted with RDP only")
        eps = skellam_epsilon(noise_multiplier, steps, delta, l2_sensitivity, dimension)
        note = "no amplification by sampling is claimed for Skellam (conservative)"
    return PrivacyEstimate(eps, delta, kind, acc, noise_multiplier, sample_rate, steps, note)


@dataclass(frozen=True)
class Spend:
    """One accounted release: `steps` runs of a mechanism, as a ledger row records it.

    Gaussian: the sampled Gaussian of DP-SGD (sample_rate < 1) or one noisy sum
    (sample_rate 1); noise std = noise_multiplier x sensitivity. Skellam: noise
    variance (noise_multiplier x l2_sensitivity)^2 in integer units, with the L1
    bound from `dimension`.
    """

    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1
    l2_sensitivity: float = 0.0
    dimension: int = 0


def rdp_of(spend: Spend, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP curve of a spend at `orders`: Opacus's sampled-Gaussian analysis, or Skellam's bound.

    Memoized: a ledger recomputes its total from every entry, and a device's entries
    repeat the same spend round after round (the sampled-Gaussian curve costs ~30 ms).
    """
    return np.array(_rdp_cached(spend, tuple(orders)))


@functools.lru_cache(maxsize=4096)
def _rdp_cached(spend: Spend, orders: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(x) for x in _rdp_uncached(spend, orders))


def _rdp_uncached(spend: Spend, orders: Sequence[float]) -> np.ndarray:
    if spend.mechanism is Mechanism.GAUSSIAN:
        _check(spend.noise_multiplier, spend.sample_rate, spend.steps, 0.5)
        return np.asarray(
            _opacus_rdp().compute_rdp(
                q=spend.sample_rate,
                noise_multiplier=spend.noise_multiplier,
                steps=spend.steps,
                orders=list(orders),
            ),
            dtype=np.float64,
        )
    _check(spend.noise_multiplier, 1.0, spend.steps, 0.5)
    l2 = spend.l2_sensitivity
    l1 = min(math.sqrt(max(spend.dimension, 1)) * l2, l2**2)
    return spend.steps * skellam_rdp(orders, (spend.noise_multiplier * l2) ** 2, l2, l1)


def epsilon_of(spends: Sequence[Spend], delta: float) -> float:
    """Epsilon of the composition of all spends (RDP curves add), 0 for none."""
    if not spends:
        return 0.0
    total = np.sum([rdp_of(s) for s in spends], axis=0)
    return rdp_to_epsilon(DEFAULT_ORDERS, total, delta)


def skellam_noise_for_epsilon(
    target_epsilon: float, steps: int, delta: float, l2: float, dimension: int
) -> float:
    """Smallest Skellam noise multiplier with `steps` releases at most target_epsilon."""
    return _smallest_noise(
        lambda z: skellam_epsilon(z, steps, delta, l2, dimension), target_epsilon
    )
