"""Federated evaluation: the counts vector devices report and its secure encoding.

An evaluation task asks each device to score one model version on its own
held-out data and report a small vector of integer counts (`EVAL_COUNTS`):
examples scored, predicted right by the version, predicted right by the
device's personalized model. The server only needs their sums: the federated
accuracy is sum(correct) / sum(examples).

Bounded contribution: a device scores at most `max_examples` of its held-out
examples (the first ones), so every count lies in [0, max_examples] and one
device's vector has L2 norm at most sqrt(d) x max_examples (d = len(counts)).
That bound is the clip user-level DP is sized for.

Under secure aggregation the vector travels through the same SecAgg+ machinery
as an update, with an exact integer encoding: a `FixedPoint` of scale 1 and
weight 1, so the encoded vector is (counts..., 1), the modular sum decodes to
the exact integer sums (plus the distributed noise, if any) and its last
element to the number of contributors. With distributed DP each device adds
Skellam noise of variance (z Delta)^2 / m to every count, Delta = C + sqrt(d)
being `FixedPoint.sensitivity` at scale 1 (the sqrt(d) term, a rounding
allowance at other scales, only over-estimates here), exactly as an update's
noise is sized, so the device verifies and accounts it with the same code.
"""

from __future__ import annotations

import math

import numpy as np

from common.quantize import HALF_RANGE, MAX_SKELLAM_VARIANCE, TAIL_SIGMAS, FixedPoint

EVAL_COUNTS: tuple[str, ...] = ("examples", "correct", "personal_correct")
"""The counts of an evaluation task, in the order of the vector."""

MAX_EVAL_EXAMPLES = 1_000_000
"""Largest per-device example bound a task may name."""


def eval_clip_norm(max_examples: int, dimension: int = len(EVAL_COUNTS)) -> float:
    """L2 bound of one device's counts vector: every count is in [0, max_examples]."""
    return math.sqrt(dimension) * max_examples


def evaluation_fixed_point(
    max_examples: int,
    cohort: int,
    noise_multiplier: float = 0.0,
    min_contributors: int = 0,
    dimension: int = len(EVAL_COUNTS),
) -> FixedPoint:
    """The exact integer encoding of an evaluation round (scale 1, weight 1).

    With noise_multiplier > 0 each device adds Skellam noise so that the sum of
    any min_contributors vectors carries noise of standard deviation
    noise_multiplier x sensitivity. Raises ValueError when the sums (with the
    noise's tail) could wrap around the 32-bit modulus.
    """
    if not 1 <= max_examples <= MAX_EVAL_EXAMPLES:
        raise ValueError(f"max_examples must be in 1..{MAX_EVAL_EXAMPLES}")
    if cohort < 1 or dimension < 1:
        raise ValueError("an evaluation round needs devices and counts")
    clip = eval_clip_norm(max_examples, dimension)
    variance = 0.0
    if noise_multiplier > 0:
        if not 1 <= min_contributors <= cohort:
            raise ValueError("noise needs 1 <= min_contributors <= cohort")
        sensitivity = clip + math.sqrt(dimension)
        variance = (noise_multiplier * sensitivity) ** 2 / min_contributors
        if variance > MAX_SKELLAM_VARIANCE:
            raise ValueError("evaluation noise beyond the accurate range of the sampler")
    peak = cohort * max_examples + TAIL_SIGMAS * math.sqrt(cohort * variance) + cohort
    if peak >= HALF_RANGE - 1:
        raise ValueError(
            f"{cohort} devices x {max_examples} examples (with noise) overflow the 32-bit sum: "
            "lower --eval-max-examples"
        )
    return FixedPoint(
        clip_norm=clip,
        scale=1.0,
        max_clients=cohort,
        max_weight=1,
        noise_variance=variance,
        dimension=dimension if variance > 0 else 0,
    )


def check_counts(counts: np.ndarray | list[int], max_examples: int) -> list[int]:
    """A device's counts as ints; ValueError naming what is wrong with them."""
    values = [int(c) for c in counts]
    if len(values) != len(EVAL_COUNTS):
        raise ValueError(f"expected {len(EVAL_COUNTS)} counts ({', '.join(EVAL_COUNTS)})")
    if any(c < 0 or c > max_examples for c in values):
        raise ValueError(f"every count must be in [0, {max_examples}]")
    examples = values[0]
    if any(c > examples for c in values[1:]):
        raise ValueError("a correct count exceeds the examples scored")
    return values
