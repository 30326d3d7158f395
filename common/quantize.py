"""Fixed-point encoding of updates for secure aggregation, modulo 2^32.

A device clips its update x to L2 norm C, scales it by its weight fraction
w/W (w = its example count capped at W), multiplies by the round's scale s
and rounds stochastically to an integer (unbiased: E[SR(v)] = v). Integers
travel as uint32, i.e. modulo 2^32 in two's complement. Every coordinate of
one encoded update is bounded by C s + 1 in absolute value, so the sum of n
updates stays inside (-2^31, 2^31) and never wraps when

    s = (2^31 - 1 - n) / (n C)                                    (for_round)

Decoding lifts the modular sum back to the centred range and divides by s.
The decoded sum differs from the exact sum of the (clipped, weighted)
updates by less than n / s in every coordinate (each device's rounding moves
a coordinate by less than 1/s), with mean zero: `error_bound`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HALF_RANGE = 1 << 31


@dataclass(frozen=True)
class FixedPoint:
    clip_norm: float
    scale: float
    max_clients: int
    max_weight: int

    @classmethod
    def for_round(cls, clip_norm: float, max_clients: int, max_weight: int) -> FixedPoint:
        if clip_norm <= 0 or max_clients < 1 or max_weight < 1:
            raise ValueError("clip norm, max clients and max weight must be positive")
        if max_clients * max_weight >= 1 << 32:
            raise ValueError("max_clients x max_weight must stay below 2^32 (the weight sum)")
        scale = (HALF_RANGE - 1 - max_clients) / (max_clients * clip_norm)
        if scale <= 0:
            raise ValueError("too many clients for a 32-bit modulus")
        return cls(clip_norm, scale, max_clients, max_weight)

    def error_bound(self, n: int) -> float:
        """Largest possible |decoded - exact| of one coordinate of a sum of n updates."""
        return n / self.scale

    def encode(self, update: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """uint32 vector of len(update) + 1: the scaled update, then the weight."""
        clipped, _ = clip_l2(update, self.clip_norm)
        w = min(max(int(weight), 1), self.max_weight)
        out = np.empty(update.size + 1, dtype=np.uint32)
        scaled = clipped.astype(np.float64) * (self.scale * w / self.max_weight)
        out[:-1] = stochastic_round(scaled, rng).astype(np.uint32)  # wraps negatives mod 2^32
        out[-1] = w
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """(sum of weighted updates, sum of weight fractions w/W) from a modular sum."""
        return centered(total[:-1]) / self.scale, int(total[-1]) / self.max_weight


def clip_l2(x: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """x scaled down to L2 norm clip_norm if longer; returns (clipped, original norm)."""
    norm = float(np.linalg.norm(x.astype(np.float64)))
    if norm > clip_norm:
        return (x * (clip_norm / norm)).astype(x.dtype, copy=False), norm
    return x, norm


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding to int64: floor(x) + Bernoulli(frac(x))."""
    floor = np.floor(x)
    frac = x - floor
    rounded: np.ndarray = (floor + (rng.random(x.shape) < frac)).astype(np.int64)
    return rounded


def centered(values: np.ndarray) -> np.ndarray:
    """uint32 residues as signed integers in [-2^31, 2^31), as float64."""
    return values.astype(np.uint32).view(np.int32).astype(np.float64)
