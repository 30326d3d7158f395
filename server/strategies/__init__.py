"""Server strategies: how a round's updates become the next global model.

One ABC, one small class per algorithm. The round coordinator streams
updates into a weighted sum (memory O(d)); a strategy sees only the
example-weighted mean update and the current global weights, which is all
FedAvg, FedProx, FedAvgM and the adaptive optimizers of Reddi et al.
(ICLR 2021) need. The robust strategies (median, trimmed mean, Krum,
Multi-Krum; `server/strategies/robust.py`) set `needs_individual_updates`:
the coordinator then keeps the round's updates, n x d, and asks the strategy
to `combine` them; they run in plain rounds only. All maths is whole-vector
numpy, no Python loops over parameters.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from server.strategies.robust import coordinate_median, multi_krum, trimmed_mean

__all__ = [
    "CoordinateMedian",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FitInstructions",
    "Krum",
    "RobustStrategy",
    "Strategy",
    "StrategyName",
    "TrimmedMean",
    "make_strategy",
]


@dataclass(frozen=True)
class FitInstructions:
    """Local-training hyper-parameters a strategy sends to the devices of a round."""

    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    momentum: float = 0.9
    extra: dict[str, str] = field(default_factory=dict)


class Strategy(ABC):
    """Turns the mean update of a round into the next global weights."""

    name: str = "strategy"
    # True: the coordinator keeps every update of a round and calls `combine` (plain rounds).
    needs_individual_updates: bool = False

    def __init__(self, fit: FitInstructions | None = None) -> None:
        self.fit = fit or FitInstructions()

    def initialize(self, params: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Allocate per-parameter state for a model of params' size."""

    def configure_fit(self, round_number: int) -> FitInstructions:
        """Instructions for the devices of round round_number."""
        return self.fit

    @abstractmethod
    def aggregate_fit(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """Next global weights from the current ones and the round's mean update."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Per-parameter optimizer state (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027
        """Restore what state_dict returned."""


class FedAvg(Strategy):
    """McMahan et al., AISTATS 2017: w <- w + eta * mean_delta (eta = 1 is plain averaging)."""

    name = "fedavg"

    def __init__(self, fit: FitInstructions | None = None, server_lr: float = 1.0) -> None:
        super().__init__(fit)
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        self.server_lr = server_lr

    def aggregate_fit(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return (params + np.float32(self.server_lr) * mean_delta).astype(np.float32, copy=False)


class FedProx(FedAvg):
    """Li et al., MLSys 2020: FedAvg aggregation; devices add mu/2 ||w - w_global||^2."""

    name = "fedprox"

    def __init__(self, fit: FitInstructions | None = None, proximal_mu: float = 0.01) -> None:
        if proximal_mu < 0:
            raise ValueError("proximal_mu must be non-negative")
        base = fit or FitInstructions()
        super().__init__(dataclasses.replace(base, proximal_mu=proximal_mu))


class FedAvgM(Strategy):
    """Hsu et al., 2019: server momentum v <- beta v + delta; w <- w + eta v."""

    name = "fedavgm"

    def __init__(
        self, fit: FitInstructions | None = None, server_lr: float = 1.0, momentum: float = 0.9
    ) -> None:
        super().__init__(fit)
        if not 0 <= momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: np.ndarray | None = None

    def initialize(self, params: np.ndarray) -> None:
        self.velocity = np.zeros_like(params, dtype=np.float32)

    def aggregate_fit(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.velocity is None or self.velocity.shape != params.shape:
            self.initialize(params)
        assert self.velocity is not None
        self.velocity *= np.float32(self.momentum)
        self.velocity += mean_delta
        return (params + np.float32(self.server_lr) * self.velocity).astype(np.float32, copy=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "velocity" in state:
            self.velocity = np.array(state["velocity"], dtype=np.float32)


class _Adaptive(Strategy):
    """Reddi et al., ICLR 2021, Algorithm 2 (no bias correction, v initialised to tau^2)."""

    def __init__(
        self,
        fit: FitInstructions | None = None,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(fit)
        if server_lr <= 0 or tau <= 0:
            raise ValueError("server_lr and tau must be positive")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def initialize(self, params: np.ndarray) -> None:
        self.m = np.zeros_like(params, dtype=np.float32)
        self.v = np.full_like(params, self.tau**2, dtype=np.float32)

    @abstractmethod
    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Second-moment update, in place."""

    def aggregate_fit(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.m is None or self.v is None or self.m.shape != params.shape:
            self.initialize(params)
        assert self.m is not None and self.v is not None
        delta = mean_delta.astype(np.float32, copy=False)
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1 - self.beta1) * delta
        self._update_v(self.v, np.square(delta))
        step: np.ndarray = self.m / (np.sqrt(self.v) + np.float32(self.tau))
        return (params + np.float32(self.server_lr) * step).astype(np.float32, copy=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "m" in state and "v" in state:
            self.m = np.array(state["m"], dtype=np.float32)
            self.v = np.array(state["v"], dtype=np.float32)


class FedAdagrad(_Adaptive):
    """v <- v + delta^2."""

    name = "fedadagrad"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq


class FedAdam(_Adaptive):
    """v <- beta2 v + (1 - beta2) delta^2."""

    name = "fedadam"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v *= np.float32(self.beta2)
        v += np.float32(1 - self.beta2) * delta_sq


class FedYogi(_Adaptive):
    """v <- v - (1 - beta2) delta^2 sign(v - delta^2)."""

    name = "fedyogi"

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v -= np.float32(1 - self.beta2) * delta_sq * np.sign(v - delta_sq)


class RobustStrategy(FedAvg):
    """Combines the round's individual updates robustly, then steps like FedAvg.

    Updates count equally, whatever example count a device claims: a hostile device
    would otherwise buy influence by claiming a large one.
    """

    needs_individual_updates = True

    @abstractmethod
    def combine(self, updates: np.ndarray) -> np.ndarray:
        """The round's update from the (n, d) stack of individual ones; ValueError if too few.

        `aggregate_fit` then applies it as FedAvg applies the mean.
        """


class CoordinateMedian(RobustStrategy):
    """Coordinate-wise median of the updates."""

    name = "median"

    def combine(self, updates: np.ndarray) -> np.ndarray:
        return coordinate_median(updates)


class TrimmedMean(RobustStrategy):
    """Yin et al., ICML 2018: coordinate-wise mean without the beta-fraction extremes."""

    name = "trimmed-mean"

    def __init__(
        self, fit: FitInstructions | None = None, server_lr: float = 1.0, trim_fraction: float = 0.1
    ) -> None:
        super().__init__(fit, server_lr)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError("--trim-fraction must be in [0, 0.5)")
        self.trim_fraction = trim_fraction

    def combine(self, updates: np.ndarray) -> np.ndarray:
        return trimmed_mean(updates, self.trim_fraction)


class Krum(RobustStrategy):
    """Blanchard et al., NeurIPS 2017: Krum (m = 1) or Multi-Krum (mean of the m best).

    m = 0 means n - f, the largest selection the paper's analysis allows.
    """

    name = "krum"

    def __init__(
        self,
        fit: FitInstructions | None = None,
        server_lr: float = 1.0,
        byzantine: int = 1,
        m: int = 1,
    ) -> None:
        super().__init__(fit, server_lr)
        if byzantine < 0 or m < 0:
            raise ValueError("--byzantine and --multi-krum-m must be non-negative")
        self.byzantine = byzantine
        self.m = m
        self.name = "krum" if m == 1 else "multi-krum"
        self.last_selected: np.ndarray = np.empty(0, dtype=np.int64)

    def combine(self, updates: np.ndarray) -> np.ndarray:
        n = updates.shape[0]
        m = self.m or n - self.byzantine
        out, self.last_selected = multi_krum(updates, self.byzantine, min(m, n))
        return out


class StrategyName(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    KRUM = "krum"
    MULTI_KRUM = "multi-krum"


ROBUST = frozenset(
    {StrategyName.MEDIAN, StrategyName.TRIMMED_MEAN, StrategyName.KRUM, StrategyName.MULTI_KRUM}
)


def make_strategy(
    name: StrategyName | str,
    fit: FitInstructions | None = None,
    server_lr: float | None = None,
    proximal_mu: float = 0.01,
    trim_fraction: float = 0.1,
    byzantine: int = 1,
    multi_krum_m: int = 0,
) -> Strategy:
    """Build a strategy by name; server_lr None keeps each algorithm's own default."""
    try:
        kind = StrategyName(name)
    except ValueError:
        known = ", ".join(s.value for s in StrategyName)
        raise ValueError(f"unknown strategy {name!r}; choose one of: {known}") from None
    lr = {} if server_lr is None else {"server_lr": server_lr}
    if kind is StrategyName.FEDAVG:
        return FedAvg(fit, **lr)
    if kind is StrategyName.FEDPROX:
        return FedProx(fit, proximal_mu=proximal_mu)
    if kind is StrategyName.FEDAVGM:
        return FedAvgM(fit, **lr)
    if kind is StrategyName.MEDIAN:
        return CoordinateMedian(fit, **lr)
    if kind is StrategyName.TRIMMED_MEAN:
        return TrimmedMean(fit, **lr, trim_fraction=trim_fraction)
    if kind in (StrategyName.KRUM, StrategyName.MULTI_KRUM):
        m = 1 if kind is StrategyName.KRUM else multi_krum_m
        return Krum(fit, **lr, byzantine=byzantine, m=m)
    adaptive: dict[StrategyName, type[_Adaptive]] = {
        StrategyName.FEDADAM: FedAdam,
        StrategyName.FEDYOGI: FedYogi,
        StrategyName.FEDADAGRAD: FedAdagrad,
    }
    return adaptive[kind](fit, **lr)
