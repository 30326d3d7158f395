"""The device decides its own protection: which tasks it runs, whatever the server asks.

A malicious server may ask for the update in the clear, or promise user-level
noise that is too small, or size each device's noise for a thousand
contributors when the sum holds two. The device checks every task against its
own settings before it downloads anything:

* secure aggregation is required unless the device was started with
  `--allow-plaintext` (a plaintext update is seen whole by the server);
* a task that promises user-level distributed DP (Skellam noise added on the
  devices, under secure aggregation) must keep a noise the device can verify from
  the task itself: its own noise variance v, the encoding's L2 sensitivity Delta
  and the contributor count n_min the noise is sized for, which must not exceed the
  cohort the round selected. The verified noise multiplier z_v = sqrt(n_min v) /
  Delta (the noise of any n_min honest uploads) must reach `--min-noise-multiplier`,
  0.5 by default: a promise of z = 1e-6 is declined by a device nobody configured;
* with `--require-user-dp` or `--max-user-epsilon E`, a task without such noise is
  declined too; central DP, added by the server, cannot be verified and is declined;
* the device keeps its own user-level ledger per model (`client/ledger.py`) of
  the spends it verified, and declines a task that would take that model past E.

What this cannot see: the device trusts that the other n_min - 1 contributors to
the sum are devices adding their own noise. A server that runs its own fake
devices in the cohort can shrink the noise of a sum to the honest devices' share
(docs/security.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.ledger import PrivacyLedger
from client.secagg import SecAggProtocolError, check_noise, fixed_point_of
from common.pb import federation_pb2 as pb
from common.privacy import Mechanism, Spend

USER_LEVEL = "user"
DISTRIBUTED = "skellam-distributed"


# A user-level noise multiplier below this protects nothing one would call private (one
# release of z = 0.5 alone is epsilon ~10 at delta 1e-5); 0 turns the check off.
DEFAULT_MIN_NOISE_MULTIPLIER = 0.5


class TaskDeclined(Exception):  # noqa: N818 - an outcome, not a failure
    """The device will not run the task; the reason goes to the server."""


@dataclass(frozen=True)
class Protection:
    """What this device insists on, whatever the task says."""

    allow_plaintext: bool = False
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER  # of tasks with DP; 0: none
    max_user_epsilon: float = 0.0  # per model; 0: no maximum
    delta: float = 1e-5
    require_user_dp: bool = False  # decline tasks without verifiable user-level DP

    def __post_init__(self) -> None:
        if self.min_noise_multiplier < 0 or self.max_user_epsilon < 0:
            raise ValueError("--min-noise-multiplier and --max-user-epsilon must be >= 0")
        if not 0 < self.delta < 1:
            raise ValueError("--delta must be in (0, 1)")

    @property
    def wants_user_dp(self) -> bool:
        return self.require_user_dp or self.max_user_epsilon > 0


def verified_user_spend(task: pb.Task) -> Spend | None:
    """The user-level release this task makes of the device's update, as the device can verify it.

    None when the task adds no distributed DP noise. Raises TaskDeclined when the
    task's noise is inconsistent with its own promise or sized for more
    contributors than the round has.
    """
    user_dp, cfg = task.privacy.user_dp, task.secagg
    if user_dp.mechanism != pb.USER_DP_SKELLAM or not cfg.enabled:
        return None
    try:
        check_noise(task)
    except SecAggProtocolError as exc:
        raise TaskDeclined(str(exc)) from None
    if cfg.min_contributors > cfg.num_selected:
        raise TaskDeclined(
            f"the task sizes each device's noise for {cfg.min_contributors} contributors, but "
            f"the round selected {cfg.num_selected} devices: the sum would carry a fraction of "
            "the promised noise"
        )
    fixed_point = fixed_point_of(cfg)
    sensitivity = fixed_point.sensitivity
    z = math.sqrt(cfg.min_contributors * cfg.noise_variance) / sensitivity
    return Spend(
        Mechanism.SKELLAM,
        z,
        1.0,
        1,
        l2_sensitivity=sensitivity,
        dimension=fixed_point.noisy_dimension,
    )


def check_task(task: pb.Task, protection: Protection, ledger: PrivacyLedger) -> Spend | None:
    """Decline (TaskDeclined with the reason) a task that breaks this device's protection.

    Returns the verified user-level spend to record before the update leaves the device.
    """
    if not task.secagg.enabled and not protection.allow_plaintext:
        raise TaskDeclined(
            "this device requires secure aggregation and the task asks for its update in the "
            "clear; plain rounds need a device started with --allow-plaintext"
        )
    spend = verified_user_spend(task)
    if spend is None:
        if not protection.wants_user_dp:
            return None
        kind = (
            "central DP, whose noise the server adds after seeing the update"
            if task.privacy.user_dp.mechanism == pb.USER_DP_CENTRAL_GAUSSIAN
            else "no user-level noise"
        )
        raise TaskDeclined(
            f"this device requires user-level DP noise it can verify, and the task has {kind}"
        )
    if spend.noise_multiplier < protection.min_noise_multiplier:
        raise TaskDeclined(
            f"the task's user-level noise multiplier is {spend.noise_multiplier:.4g} (verified "
            f"from its noise and {task.secagg.min_contributors} contributors), below this "
            f"device's minimum {protection.min_noise_multiplier:g} (--min-noise-multiplier)"
        )
    budget = protection.max_user_epsilon
    if budget > 0:
        model, delta = task.model_name, protection.delta
        spent = ledger.epsilon(delta, USER_LEVEL, model)
        after = ledger.epsilon_after(spend, delta, USER_LEVEL, model)
        if after > budget:
            raise TaskDeclined(
                f"user-level privacy budget of model {model!r} exceeded: spent {spent:.3f} of "
                f"{budget:g} (delta {delta:g}); this round would bring it to {after:.3f}"
            )
    return spend
