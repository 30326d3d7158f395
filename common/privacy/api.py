"""The seed's Python API for differential privacy (docs: ../shared/seed/ai-finetuning.md).

`DifferentialPrivacy(epsilon, delta)` releases values with the analytic
Gaussian mechanism (Balle and Wang, ICML 2018): the smallest sigma whose
privacy loss profile gives exactly (epsilon, delta) for the stated L2
sensitivity, valid for every epsilon (the textbook sqrt(2 ln(1.25/delta))/epsilon
is only proven for epsilon < 1 and is looser).

`PrivacyAnalyzer.compute_privacy_budget(epsilon, num_queries)` composes k
epsilon-DP queries correctly: the better of basic composition (k epsilon) and
the advanced composition theorem (Dwork, Rothblum and Vadhan 2010):
sqrt(2 k ln(1/delta')) epsilon + k epsilon (e^epsilon - 1), at delta' = 1e-5.
The seed's example (1.0 per query, 100 queries -> 3.16) is sqrt(k) epsilon,
which no composition theorem gives for pure epsilon-DP queries; for
epsilon = 1 and k = 100 the correct total is 100 (basic composition wins).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.privacy import privacy_status


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest sigma making the Gaussian mechanism (epsilon, delta)-DP (Balle & Wang 2018)."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError("epsilon and sensitivity must be positive and delta in (0, 1)")

    def delta_of(sigma: float) -> float:
        a = sensitivity / (2 * sigma)
        b = epsilon * sigma / sensitivity
        return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)

    low, high = 1e-6 * sensitivity, sensitivity
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if delta_of(mid) > delta:
            low = mid
        else:
            high = mid
    return high


class DifferentialPrivacy:
    """Gaussian noise and L2 clipping with an (epsilon, delta) guarantee per release."""

    def __init__(self, epsilon: float, delta: float = 1e-5, seed: int | None = None) -> None:
        if epsilon <= 0 or not 0 < delta < 1:
            raise ValueError("epsilon must be positive and delta in (0, 1)")
        self.epsilon = epsilon
        self.delta = delta
        self._rng = np.random.default_rng(seed)

    def noise_scale(self, sensitivity: float) -> float:
        return analytic_gaussian_sigma(self.epsilon, self.delta, sensitivity)

    def add_noise(self, data: Any, sensitivity: float = 1.0) -> np.ndarray:
        """data + N(0, sigma^2 I), sigma calibrated to the L2 sensitivity."""
        values = np.asarray(data, dtype=np.float64)
        return values + self._rng.normal(0.0, self.noise_scale(sensitivity), values.shape)

    @staticmethod
    def clip_gradients(gradients: Any, max_norm: float = 1.0) -> Any:
        """Scale gradients (an array or a list of arrays) to a joint L2 norm of at most max_norm."""
        if max_norm <= 0:
            raise ValueError("max_norm must be positive")
        parts = gradients if isinstance(gradients, list | tuple) else [gradients]
        arrays = [np.asarray(g, dtype=np.float64) for g in parts]
        norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
        factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped = [a * factor for a in arrays]
        return clipped if isinstance(gradients, list | tuple) else clipped[0]


@dataclass
class PrivacyAnalyzer:
    """Composition arithmetic and a log of privacy-consuming operations."""

    delta_prime: float = 1e-5
    operations: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def compute_privacy_budget(self, epsilon: float, num_queries: int) -> dict[str, Any]:
        if epsilon <= 0 or num_queries < 1:
            raise ValueError("epsilon must be positive and num_queries at least 1")
        k = num_queries
        basic = k * epsilon
        advanced = math.sqrt(2 * k * math.log(1 / self.delta_prime)) * epsilon + k * epsilon * (
            math.exp(epsilon) - 1
        )
        total, theorem = (basic, "basic") if basic <= advanced else (advanced, "advanced")
        return {
            "per_query_epsilon": epsilon,
            "total_queries": k,
            "total_epsilon": round(total, 6),
            "total_delta": 0.0 if theorem == "basic" else self.delta_prime,
            "composition": theorem,
            "privacy_guarantee": "differential_privacy",
        }

    def log_privacy_operation(
        self, operation: str, epsilon_used: float, data_accessed: int = 0, delta_used: float = 0.0
    ) -> None:
        if epsilon_used < 0 or delta_used < 0:
            raise ValueError("privacy costs are non-negative")
        with self._lock:
            self.operations.append(
                {
                    "operation": operation,
                    "epsilon_used": epsilon_used,
                    "delta_used": delta_used,
                    "data_accessed": data_accessed,
                    "time": time.time(),
                }
            )

    def get_privacy_report(self) -> dict[str, Any]:
        """Totals by basic composition of the logged (epsilon, delta) costs."""
        with self._lock:
            eps = sum(op["epsilon_used"] for op in self.operations)
            delta = sum(op["delta_used"] for op in self.operations)
            return {
                "total_operations": len(self.operations),
                "total_epsilon_used": round(eps, 6),
                "total_delta_used": delta,
                "privacy_status": privacy_status(eps),
                "composition": "basic",
            }
