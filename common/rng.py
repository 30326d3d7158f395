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
the OS per training, one keystream call per step into a buffer kept across
steps, turned into Gaussians by the Box-Muller transform in float32 with
torch's vectorized (SIMD) conversion, log, sqrt, cos and sin, in place: a
cryptographic generator (torch's `normal_` is a Mersenne Twister) at about
0.6 of `normal_`'s CPU time.
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

    Each fill takes one keystream call of 8 bytes per pair of draws into a
    buffer kept across fills. A pair of 32-bit words (a, b) gives
    u = (k + 1/2) 2^-31 in (0, 1) from k, a's low 31 bits, and theta = 2 pi b
    2^-32 in [-pi, pi) from b read as a signed integer; then r = std sqrt(-2 ln u)
    and the draws r cos theta and r sin theta. u's smallest value is 2^-32, so
    draws reach 6.66 standard deviations (torch's float32 `normal_` uses 24-bit
    uniforms and stops at 5.8); k is converted exactly up to 2^24, so the far
    tail is not rounded. The transform runs as torch's vectorized (SLEEF, SIMD)
    float32 operations in place on buffers kept across fills: no float64
    temporary, no allocation per fill. Float32 rounding in the transform is a few
    units in the last place.
    """

    def __init__(self, size: int, seed: int | None = None) -> None:
        import torch

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
        self._zeros = bytes(8 * self._half)
        words = torch.from_numpy(self._room[: 2 * self._half].view(np.int32))
        self._a, self._b = words[: self._half], words[self._half :]
        self._r = torch.empty(self._half, dtype=torch.float32)
        self._theta = torch.empty(self._half, dtype=torch.float32)

    def fill(self, out: np.ndarray, std: float) -> np.ndarray:
        """Overwrite out (float32, C-contiguous, length `size`) with N(0, std^2) draws."""
        import torch

        if out.dtype != np.float32 or out.shape != (self.size,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 vector of length {self.size}")
        self.fill_tensor(torch.from_numpy(out), std)
        return out

    def fill_tensor(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """`fill` for a CPU float32 torch vector (DP-SGD's gradient buffer), in place."""
        import torch

        if (
            out.dtype != torch.float32
            or tuple(out.shape) != (self.size,)
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ValueError(f"out must be a contiguous float32 vector of length {self.size}")
        self._cipher.update_into(self._zeros, memoryview(self._room.view(np.uint8)))  # type: ignore[arg-type]
        return box_muller_(self._a, self._b, out, std, self._r, self._theta)


def box_muller_(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    std: float,
    r: torch.Tensor,
    theta: torch.Tensor,
) -> torch.Tensor:
    """Box-Muller from uniform int32 words a and b (length h) into out (length h or 2h - 1).

    out[:h] = std sqrt(-2 ln u) cos theta and out[h:] the sin half, with u = (k + 1/2) 2^-31
    (k: a's low 31 bits) and theta = 2 pi b 2^-32 (b signed). a is overwritten (masked)
    and r, theta (float32, length h) are scratch: all in place, no allocation.
    """
    import torch

    h = a.shape[0]
    m = out.shape[0] - h
    # Int32 to float32 is one SIMD conversion (numpy's uint32 one is several times slower).
    r.copy_(a.bitwise_and_(0x7FFFFFFF))
    r.add_(0.5).mul_(2.0**-31).log_()  # ln u, u computed first: no cancellation near 1
    r.mul_(-2.0 * std * std).sqrt_()
    theta.copy_(b).mul_(2.0 * math.pi * 2.0**-32)
    torch.cos(theta, out=out[:h]).mul_(r)
    torch.sin(theta[:m], out=out[h:]).mul_(r[:m])
    return out
