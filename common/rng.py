"""Generators for the noise and rounding a device adds: seeded from the OS CSPRNG, per use.

Differential privacy holds only if the server cannot predict the noise, so the
generators that draw it are never seeded from configuration, a clock or a
process-wide state that forked processes share. Each use (one round's
encoding, one local DP-SGD training) gets a new generator seeded from
`os.urandom`: numpy's PCG64 with 256 bits (the SecAgg rounding and the
Skellam noise) and torch's generator with 63 bits (Opacus DP-SGD's Poisson
sampling, and its Gaussian noise for models without a packed one-pass form;
torch takes a 64-bit seed). Neither stream is a
cryptographic generator: an observer of enough raw outputs could in principle
recover PCG64's state, but the outputs never leave the device in the clear
(only their rounded sum with the update, masked), and a fresh seed per use
bounds any such recovery to one round.

`GaussianNoise` is DP-SGD's noise for the packed (one-pass) models: an
AES-128-CTR keystream, a cryptographic generator keyed with 128 bits from
the OS per training, turned into Gaussians by the Box-Muller transform in
float32 with numpy's vectorized log, sqrt, cos and sin: a cryptographic
generator (torch's `normal_` is a Mersenne Twister) at about its cost on a
quiet machine (half its CPU time measured under load).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

if TYPE_CHECKING:
    import torch

SEED_BYTES = 32


def os_seeded_generator() -> np.random.Generator:
    """A numpy PCG64 generator seeded with 256 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(SEED_BYTES), "big")))


def os_seeded_torch_generator() -> torch.Generator:
    """A torch CPU generator seeded with 63 bits from the OS CSPRNG."""
    import torch

    seed = int.from_bytes(os.urandom(8), "big") >> 1
    return torch.Generator().manual_seed(seed)


class GaussianNoise:
    """Independent N(0, std^2) float32 draws from an AES-128-CTR keystream (Box-Muller).

    With seed None the key is 16 bytes of `os.urandom`; an int seed (tests
    only) keys it with SHA-256 of the seed, so a run can be replayed. The
    keystream never repeats within a generator (one counter, 2^128 blocks).

    Each pair of 32-bit words (a, b) gives r = sqrt(-2 ln u) with u = a 2^-32
    + 2^-33 in (0, 1] and theta = 2 pi b 2^-32, then r cos theta and r sin
    theta. u's smallest value is 2^-33, so draws reach 6.7 standard
    deviations (torch's float32 `normal_` uses 24-bit uniforms and stops at
    5.8). Float32 rounding in the transform is a few units in the last place.
    """

    def __init__(self, size: int, seed: int | None = None) -> None:
        if size < 1:
            raise ValueError("GaussianNoise needs a size of at least 1")
        if seed is None:
            key = os.urandom(16)
        else:
            label = b"xeno-gaussian-noise" + seed.to_bytes(16, "big", signed=True)
            key = hashlib.sha256(label).digest()[:16]
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.size = size
        self._half = (size + 1) // 2
        # update_into wants room for a block beyond its input: 4 spare words past the end.
        self._room = np.empty(2 * self._half + 4, np.uint32)
        self._words = self._room[: 2 * self._half]
        self._zeros = bytes(self._words.nbytes)
        self._uniform = np.empty(2 * self._half, np.float32)

    def fill(self, out: np.ndarray, std: float) -> np.ndarray:
        """Overwrite out (float32, C-contiguous, length `size`) with N(0, std^2) draws."""
        if out.dtype != np.float32 or out.shape != (self.size,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 vector of length {self.size}")
        h, m = self._half, self.size - self._half
        self._cipher.update_into(self._zeros, memoryview(self._room.view(np.uint8)))  # type: ignore[arg-type]
        u = self._uniform
        np.multiply(self._words, np.float32(2.0**-32), out=u, dtype=np.float32, casting="unsafe")
        r, theta = u[:h], u[h:]
        np.add(r, np.float32(2.0**-33), out=r)
        np.log(r, out=r)
        np.multiply(r, np.float32(-2.0 * std * std), out=r)
        np.sqrt(r, out=r)
        np.multiply(theta, np.float32(2.0 * math.pi), out=theta)
        np.cos(theta, out=out[:h])
        np.multiply(out[:h], r, out=out[:h])
        np.sin(theta[:m], out=out[h:])
        np.multiply(out[h:], r[:m], out=out[h:])
        return out
