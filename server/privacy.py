"""User-level DP of the global model: the server's policy, its accounting, its budget.

Owns what the server decides about differential privacy (no gRPC here):

- `UserDpPolicy`: the mechanism of every round's noisy sum. `distributed`:
  devices add Skellam noise under secure aggregation and the server adds
  nothing; `central`: a trusted server clips each update and adds Gaussian
  noise to the plain sum. In both, every contribution is clipped to C and
  weighted equally, and the noise standard deviation is z x sensitivity.
- `PrivacyAccount`: the cumulative epsilon of a model from its ledger rows
  (RDP curves add over rounds; `common.privacy` computes them), the spend
  of the next round, and the global budget check.

No amplification by sampling is claimed for user-level rounds: cohorts are
chosen from whoever is online, not by Poisson sampling, so each round is
accounted as a full release (sample rate 1).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.privacy import (
    Mechanism,
    Spend,
    epsilon_of,
    noise_for_epsilon,
    privacy_status,
    skellam_noise_for_epsilon,
)
from common.quantize import FixedPoint
from server.store import PrivacyRecord, Store


class UserDpMechanism(enum.StrEnum):
    NONE = "none"
    DISTRIBUTED = "distributed"  # Skellam under secure aggregation
    CENTRAL = "central"  # Gaussian added by a trusted server


LEDGER_MECHANISM = {
    UserDpMechanism.DISTRIBUTED: "skellam-distributed",
    UserDpMechanism.CENTRAL: "gaussian-central",
}


@dataclass(frozen=True)
class UserDpPolicy:
    mechanism: UserDpMechanism
    noise_multiplier: float
    clip_norm: float
    min_contributors: int
    delta: float = 1e-5
    budget: float = 0.0  # epsilon; 0: no global budget
    # Adaptive clipping (Andrew et al., NeurIPS 2021): move the clip towards the
    # target_quantile of update norms, C <- C exp(-clip_lr (noisy fraction inside - quantile)),
    # the fraction counted with noise count_noise (in devices). 0: a fixed clip.
    target_quantile: float = 0.0
    clip_lr: float = 0.2
    count_noise: float = 0.0

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier of the update sum; the count takes its share of the budget.

        Andrew et al. 2021, Thm 1: z^-2 = z_update^-2 + (2 count_noise)^-2.
        """
        if not self.adaptive:
            return self.noise_multiplier
        return float((self.noise_multiplier**-2 - (2 * self.count_noise) ** -2) ** -0.5)

    def next_clip(self, clip: float, noisy_inside: float, contributors: int) -> float:
        fraction = noisy_inside / max(contributors, 1)
        return clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def __post_init__(self) -> None:
        if self.mechanism is UserDpMechanism.NONE:
            raise ValueError("a user-level DP policy needs a mechanism")
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError("the DP noise multiplier must be positive")
        if not self.clip_norm > 0:
            raise ValueError("the DP clip norm must be positive")
        if self.min_contributors < 1:
            raise ValueError("min_contributors must be at least 1")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.budget < 0:
            raise ValueError("the privacy budget must be non-negative (0: none)")
        if self.adaptive:
            if not 0 < self.target_quantile < 1 or self.clip_lr <= 0:
                raise ValueError("adaptive clipping needs a quantile in (0, 1) and a positive rate")
            if 2 * self.count_noise <= self.noise_multiplier:
                raise ValueError(
                    f"adaptive clipping: the count noise ({self.count_noise:g}) must exceed half "
                    f"the noise multiplier ({self.noise_multiplier:g}); raise --dp-clip-count-noise"
                )

    def fixed_point(self, cohort: int, dimension: int, clip: float | None = None) -> FixedPoint:
        """The round's encoding with Skellam noise sized for min_contributors devices."""
        return FixedPoint.for_round(
            self.clip_norm if clip is None else clip,
            cohort,
            1,
            noise_multiplier=self.noise_multiplier,
            min_contributors=min(self.min_contributors, cohort),
            dimension=dimension,
            count_noise=self.count_noise if self.adaptive else 0.0,
        )

    def spend(self, fixed_point: FixedPoint | None) -> Spend:
        if self.mechanism is UserDpMechanism.DISTRIBUTED:
            assert fixed_point is not None
            return Spend(
                Mechanism.SKELLAM,
                self.noise_multiplier,
                l2_sensitivity=fixed_point.sensitivity,
                dimension=fixed_point.noisy_dimension,
            )
        return Spend(Mechanism.GAUSSIAN, self.noise_multiplier)


def noise_for_target(
    mechanism: UserDpMechanism,
    target_epsilon: float,
    rounds: int,
    delta: float,
    clip_norm: float,
    cohort: int,
    min_contributors: int,
    dimension: int,
) -> float:
    """The noise multiplier that spends target_epsilon over `rounds` full releases."""
    if rounds < 1:
        raise ValueError("a target epsilon needs a finite number of rounds (--rounds)")
    if mechanism is UserDpMechanism.CENTRAL:
        return noise_for_epsilon(target_epsilon, 1.0, rounds, delta)
    # The Skellam sensitivity depends on the scale, which depends on the noise: two passes.
    z = noise_for_epsilon(target_epsilon, 1.0, rounds, delta)
    for _ in range(2):
        fp = FixedPoint.for_round(clip_norm, cohort, 1, z, min(min_contributors, cohort), dimension)
        z = skellam_noise_for_epsilon(target_epsilon, rounds, delta, fp.sensitivity, dimension)
    return z


def spend_of(record: PrivacyRecord) -> Spend:
    if record.mechanism.startswith("skellam"):
        return Spend(
            Mechanism.SKELLAM,
            record.noise_multiplier,
            l2_sensitivity=record.sensitivity,
            dimension=record.dimension,
            steps=record.steps,
        )
    return Spend(Mechanism.GAUSSIAN, record.noise_multiplier, record.sample_rate, record.steps)


@dataclass(frozen=True)
class PrivacyAccount:
    """The cumulative user-level epsilon of one model, from its ledger."""

    records: Sequence[PrivacyRecord]
    delta: float

    @property
    def epsilon(self) -> float:
        return epsilon_of([spend_of(r) for r in self._user()], self.delta)

    def epsilon_after(self, spend: Spend) -> float:
        return epsilon_of([*(spend_of(r) for r in self._user()), spend], self.delta)

    def epsilon_of_rounds(self, round_ids: set[str]) -> float:
        """Epsilon of one device that contributed to round_ids only."""
        return epsilon_of(
            [spend_of(r) for r in self._user() if r.round_id in round_ids], self.delta
        )

    @property
    def status(self) -> str:
        return privacy_status(self.epsilon) if self._user() else "none"

    def _user(self) -> list[PrivacyRecord]:
        return [r for r in self.records if r.level == "user"]


def budget_message(model: str, spent: float, budget: float, next_total: float) -> str:
    return (
        f"privacy budget of model {model!r} exhausted: spent epsilon {spent:.3f} of "
        f"{budget:g}; the next round would reach {next_total:.3f}. No more rounds start: "
        "raise --privacy-budget, or train a new model"
    )


@dataclass(frozen=True)
class DeviceSummary:
    device_id: str
    rounds: int
    epsilon: float
    reported_sample_epsilon: float  # -1: the device reported none


@dataclass(frozen=True)
class PrivacyReportData:
    model: str
    records: list[PrivacyRecord]
    epsilon: float
    delta: float
    status: str
    budget: float
    devices: list[DeviceSummary]


def privacy_report(store: Store, model: str, budget: float = 0.0) -> PrivacyReportData:
    """The ledger of a model, its total, and what each device's contributions cost it."""
    records = store.privacy_ledger(model)
    user = [r for r in records if r.level == "user"]
    delta = user[-1].delta if user else 1e-5
    account = PrivacyAccount(records, delta)
    dp_rounds = {r.round_id for r in user}
    per_device: dict[str, set[str]] = {}
    sample_eps: dict[str, float] = {}
    for round_id, device_id, metrics in store.contributions(model):
        if round_id in dp_rounds:
            per_device.setdefault(device_id, set()).add(round_id)
        if "dp_sgd_epsilon" in metrics:  # cumulative on the device: the largest is the latest
            reported = float(metrics["dp_sgd_epsilon"])
            sample_eps[device_id] = max(reported, sample_eps.get(device_id, reported))
            per_device.setdefault(device_id, set())
    devices = [
        DeviceSummary(
            device,
            len(rounds),
            account.epsilon_of_rounds(rounds),
            sample_eps.get(device, -1.0),
        )
        for device, rounds in sorted(per_device.items())
    ]
    return PrivacyReportData(
        model, records, account.epsilon, delta, account.status, budget, devices
    )
