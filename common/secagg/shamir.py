"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret s is the constant term of a random polynomial f of degree t - 1;
the share for x (x >= 1) is f(x). Any t shares give s back by Lagrange
interpolation at 0; fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # 521 bits


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of `secret` for the points xs (distinct, 1 <= x < p)."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int], threshold: int, secret_len: int = 32) -> bytes:
    """The secret from at least `threshold` shares {x: f(x)}."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = list(shares.items())[:threshold]
    xs = [x for x, _ in points]
    # Lagrange at 0: secret = sum y_i num_i / den_i. The points are small integers
    # (ranks of devices), so num_i and den_i are exact products of small integers,
    # reduced once; and one modular inverse serves all the den_i (Montgomery's batch
    # inversion). The unmasking combines one secret per surviving device.
    product = 1
    for x in xs:
        product *= -x
    nums = [product // -x % PRIME for x in xs]
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                den *= xi - xj
        dens.append(den % PRIME)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)  # 1 / (den_0 ... den_{t-1})
    secret = 0
    for i in range(len(points) - 1, -1, -1):
        inv_den = inverse * prefix[i] % PRIME  # 1 / den_i
        inverse = inverse * dens[i] % PRIME  # 1 / (den_0 ... den_{i-1})
        secret = (secret + points[i][1] * nums[i] * inv_den) % PRIME
    if secret >= 1 << (8 * secret_len):
        raise ValueError("shares are inconsistent: the result is not a secret of this size")
    return secret.to_bytes(secret_len, "big")


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share outside the field")
    return y
