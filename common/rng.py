"""Generators for the noise and rounding a device adds: seeded from the OS CSPRNG, per use.

Differential privacy holds only if the server cannot predict the noise, so the
generators that draw it are never seeded from configuration, a clock or a
process-wide state that forked processes share. Each use (one round's
encoding, one local DP-SGD training) gets a new generator seeded from
`os.urandom`: numpy's PCG64 with 256 bits (the SecAgg rounding and the
Skellam noise) and torch's generator with 63 bits (Opacus DP-SGD's Poisson
sampling and Gaussian noise; torch takes a 64-bit seed). Neither stream is a
cryptographic generator: an observer of enough raw outputs could in principle
recover PCG64's state, but the outputs never leave the device in the clear
(only their rounded sum with the update, masked), and a fresh seed per use
bounds any such recovery to one round.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

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
