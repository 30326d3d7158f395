"""Cryptographic building blocks of secure aggregation (SecAgg / SecAgg+).

Small pure functions over `cryptography` primitives: X25519 key agreement
with HKDF-SHA256, AES-GCM share encryption bound to (round, sender,
receiver), an AES-CTR mask generator expanded straight into numpy uint32,
Ed25519 signatures of round keys, Shamir secret sharing over the prime
field GF(2^521 - 1), and the SecAgg+ neighbour graph with its parameters.
The protocol logic lives in server/secagg.py and client/secagg.py.
"""

from common.secagg.crypto import (
    KeyPair,
    agree,
    decrypt_share,
    encrypt_share,
    generate_keypair,
    keys_message,
    prg_uint32,
    sign_keys,
    verify_keys,
)
from common.secagg.graph import SecAggParams, derive_params, neighbours
from common.secagg.shamir import PRIME, combine, split

__all__ = [
    "PRIME",
    "KeyPair",
    "SecAggParams",
    "agree",
    "combine",
    "decrypt_share",
    "derive_params",
    "encrypt_share",
    "generate_keypair",
    "keys_message",
    "neighbours",
    "prg_uint32",
    "sign_keys",
    "split",
    "verify_keys",
]
