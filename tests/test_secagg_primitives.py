"""Crypto and quantization building blocks of secure aggregation, against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from common.quantize import FixedPoint, centered, clip_l2, stochastic_round
from common.secagg import (
    agree,
    combine,
    decrypt_share,
    derive_params,
    encrypt_share,
    generate_keypair,
    keys_message,
    neighbours,
    prg_uint32,
    sign_keys,
    split,
    verify_keys,
)
from common.secagg.crypto import apply_masks, share_ad
from common.secagg.graph import graph_seed, neighbourhood


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_shamir_any_t_shares_recover_the_secret(secret: bytes, n: int, data) -> None:
    t = data.draw(st.integers(1, n))
    shares = split(secret, list(range(1, n + 1)), t)
    subset = data.draw(st.permutations(list(shares)))[:t]
    assert combine({x: shares[x] for x in subset}, t) == secret


def test_shamir_fewer_than_t_shares_do_not_give_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, [1, 2, 3, 4, 5], 3)
    with pytest.raises(ValueError):
        combine({1: shares[1], 2: shares[2]}, 3)
    # two shares interpolated as if t were 2 give an unrelated value
    try:
        wrong = combine({1: shares[1], 2: shares[2]}, 2)
    except ValueError:
        wrong = None  # not even a 32-byte value
    assert wrong != secret


def test_key_agreement_is_symmetric_and_context_bound() -> None:
    a, b = generate_keypair(), generate_keypair()
    assert agree(a.private, b.public, b"x") == agree(b.private, a.public, b"x")
    assert agree(a.private, b.public, b"x") != agree(a.private, b.public, b"y")


def test_share_encryption_binds_round_sender_and_receiver() -> None:
    key = bytes(32)
    blob = encrypt_share(key, b"share", share_ad("r1", "a", "b"))
    assert decrypt_share(key, blob, share_ad("r1", "a", "b")) == b"share"
    assert decrypt_share(key, blob, share_ad("r2", "a", "b")) is None  # replay into another round
    assert decrypt_share(key, blob, share_ad("r1", "c", "b")) is None  # wrong sender
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert decrypt_share(key, tampered, share_ad("r1", "a", "b")) is None


def test_round_key_signatures_verify_only_unchanged_keys() -> None:
    identity = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    msg = keys_message("r1", "dev-a", b"\x01" * 32, b"\x02" * 32)
    sig = sign_keys(identity, msg)
    assert verify_keys(pub, msg, sig)
    assert not verify_keys(pub, keys_message("r1", "dev-a", b"\x01" * 32, b"\x03" * 32), sig)
    assert not verify_keys(pub, keys_message("r2", "dev-a", b"\x01" * 32, b"\x02" * 32), sig)


def test_prg_is_the_aes_ctr_keystream_and_deterministic() -> None:
    seed = bytes(range(32))
    out = prg_uint32(seed, 1000)
    enc = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()
    reference = np.frombuffer(enc.update(bytes(4000)), dtype="<u4")
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(prg_uint32(seed, 1000), out)
    assert not np.array_equal(prg_uint32(bytes(32), 1000), out)
    big = prg_uint32(seed, (1 << 21) + 3)  # crosses the internal 4 MiB step
    np.testing.assert_array_equal(big[:1000], out)


@pytest.mark.parametrize("length", [0, 1, 15, 16, 59, 60, 61, (1 << 20) + 7, (1 << 21) + 5])
def test_prg_written_in_place_matches_the_keystream_at_every_length(length: int) -> None:
    seed = bytes(range(1, 33))
    enc = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()
    reference = np.frombuffer(enc.update(bytes(4 * length)), dtype="<u4")
    out = np.full(length, 0xDEADBEEF, dtype=np.uint32)
    assert prg_uint32(seed, length, out) is out
    np.testing.assert_array_equal(out, reference)
    with pytest.raises(ValueError, match="uint32 vector"):
        prg_uint32(seed, length + 1, out)


@pytest.mark.parametrize("length", [0, 1, 5, 1 << 15, (1 << 15) + 3, 100_003])
def test_apply_masks_adds_and_subtracts_each_whole_keystream(length: int) -> None:
    rng = np.random.default_rng(length)
    total = rng.integers(0, 1 << 32, length, dtype=np.uint64).astype(np.uint32)
    masks = [(bytes([i]) * 32, sign) for i, sign in enumerate((1, -1, -1, 1, -1))]
    expected = total.copy()
    for seed, sign in masks:  # the reference: whole masks, one at a time (mod 2^32)
        expected = expected + prg_uint32(seed, length) * np.uint32(sign % (1 << 32))
    assert apply_masks(total, masks) is total
    np.testing.assert_array_equal(total, expected)


def test_device_masking_is_the_update_plus_each_whole_mask() -> None:
    from client.secagg import mask_update

    length = 300_001  # not a whole number of blocks
    rng = np.random.default_rng(7)
    encoded = rng.integers(0, 1 << 32, length, dtype=np.uint64).astype(np.uint32)
    before = encoded.copy()
    self_seed = bytes([9]) * 32
    pairwise = [(bytes([i]) * 32, sign) for i, sign in enumerate((1, -1, -1, 1))]
    # the reference: PRG(b), then each neighbour's whole mask added or subtracted (mod 2^32)
    expected = encoded.astype(np.int64) + prg_uint32(self_seed, length).astype(np.int64)
    for seed, sign in pairwise:
        expected = (expected + sign * prg_uint32(seed, length).astype(np.int64)) % (1 << 32)
    masked = mask_update(encoded, self_seed, pairwise)
    np.testing.assert_array_equal(masked, expected.astype(np.uint32))
    np.testing.assert_array_equal(encoded, before)  # the encoded update is left as it was


def test_apply_masks_refuses_bad_input_and_leaves_the_sum() -> None:
    total = np.arange(10, dtype=np.uint32)
    for bad, message in (
        ([(bytes(31), 1)], "32 bytes"),
        ([(bytes(32), 2)], "signs"),
    ):
        with pytest.raises(ValueError, match=message):
            apply_masks(total, bad)
        np.testing.assert_array_equal(total, np.arange(10, dtype=np.uint32))
    with pytest.raises(ValueError, match="uint32"):
        apply_masks(np.zeros(10, dtype=np.int64), [])


def test_shamir_combine_is_lagrange_at_zero_for_any_points() -> None:
    secret = bytes(range(32))
    shares = split(secret, [1, 2, 3, 50, 97, 200], 4)
    for points in ([1, 2, 3, 50], [200, 97, 3, 1], [2, 50, 97, 200, 1]):
        assert combine({x: shares[x] for x in points}, 4) == secret


@pytest.mark.parametrize("n", [3, 10, 57, 100, 200])
def test_neighbour_graph_is_regular_symmetric_and_shared(n: int) -> None:
    ids = [f"d{i:03d}" for i in range(n)]
    params = derive_params(n)
    graph = neighbours(ids, params.degree, graph_seed("r", ids))
    assert all(len(v) == min(params.degree, n - 1) for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])
    assert all(u not in graph[u] for u in graph)
    assert graph == neighbours(list(reversed(ids)), params.degree, graph_seed("r", ids))


@pytest.mark.parametrize("n", [2, 3, 10, 57, 100, 200])
def test_a_devices_neighbourhood_is_its_rows_of_the_whole_graph(n: int) -> None:
    ids = [f"d{i:03d}" for i in range(n)]
    degree = derive_params(n).degree if n > 2 else 1
    seed = graph_seed("r", ids)
    graph = neighbours(ids, degree, seed)
    for me in ids:
        rows = neighbourhood(list(reversed(ids)), degree, seed, me)
        assert rows == {u: graph[u] for u in [me, *graph[me]]}
    with pytest.raises(ValueError, match="not participants"):
        neighbours(ids, degree, seed, ["stranger"])


def test_derived_params_grow_logarithmically_and_meet_the_failure_target() -> None:
    # Semi-honest (no corrupt devices assumed): the degree grows like log n.
    small, big = derive_params(100, corrupt_fraction=0), derive_params(1000, corrupt_fraction=0)
    assert big.degree <= small.degree + 8 and big.degree < 60
    for n in (100, 1000):
        for gamma in (0.0, 0.05, 0.1):
            p = derive_params(n, corrupt_fraction=gamma)
            tail = sum(
                math.comb(p.degree, i) * 0.9**i * 0.1 ** (p.degree - i) for i in range(p.threshold)
            )
            assert n * tail <= 1e-6 and p.threshold > (p.degree + 1) / 2
    assert derive_params(5) == derive_params(5).__class__(degree=4, threshold=3)


@pytest.mark.parametrize("n", [5, 10, 20, 57, 100, 1000])
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1, 0.2])
def test_threshold_leaves_the_server_one_share_short_of_both_secrets(n: int, gamma: float) -> None:
    """2t > k + 1 + a: honest holders reveal one secret each, corrupt ones both."""
    from scipy.stats import hypergeom

    from common.secagg.graph import SECURITY_BITS, corrupt_neighbours, threshold_bound

    p = derive_params(n, corrupt_fraction=gamma)
    k, corrupt = p.degree, math.floor(gamma * n + 1e-9)
    a = corrupt_neighbours(n, k, gamma)
    if k == n - 1:  # complete graph: every corrupt device holds a share (Bonawitz et al.)
        assert a == corrupt and p.threshold == min((n + corrupt) // 2 + 1, n)
    else:  # an independent quantile: P[more than a corrupt neighbours] <= 2^-40 / n
        rv = hypergeom(n - 1, corrupt, k)
        assert rv.sf(a) <= 2.0**-SECURITY_BITS / n * (1 + 1e-6)
        assert a == 0 or rv.sf(a - 1) > 2.0**-SECURITY_BITS / n
    assert p.threshold == threshold_bound(n, k, gamma)
    if p.threshold <= k + 1 and corrupt < n // 2:
        assert 2 * p.threshold > k + 1 + a


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_fixed_point_sum_never_wraps_and_stays_within_the_bound(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    fp = FixedPoint.for_round(clip_norm=3.0, max_clients=n, max_weight=100)
    updates = [rng.normal(0, 5, 50).astype(np.float32) for _ in range(n)]
    weights = rng.integers(1, 200, n)
    total = np.zeros(51, dtype=np.uint32)
    for u, w in zip(updates, weights, strict=True):
        total += fp.encode(u, int(w), rng)
    decoded, weight_sum = fp.decode(total)
    exact = sum(
        clip_l2(u, 3.0)[0].astype(np.float64) * min(int(w), 100) / 100
        for u, w in zip(updates, weights, strict=True)
    )
    assert np.max(np.abs(decoded - exact)) <= fp.error_bound(n)
    assert weight_sum == pytest.approx(sum(min(int(w), 100) for w in weights) / 100)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 1000),
    spread=st.sampled_from([1e-3, 0.3, 50.0, 1e4]),
    weight=st.integers(-3, 5000),
)
def test_encoding_is_stochastic_rounding_of_the_clipped_weighted_update(
    seed: int, n: int, spread: float, weight: int
) -> None:
    """The encoding against its definition: SR(clip(x) s w / W) mod 2^32, the same draws."""
    fp = FixedPoint.for_round(clip_norm=7.0, max_clients=n, max_weight=1000)
    x = np.random.default_rng(seed).normal(0, spread, 301).astype(np.float32)
    x[:3] = [0.0, -0.0, x[3]]
    w = min(max(weight, 1), 1000)
    scaled = clip_l2(x, 7.0)[0].astype(np.float64) * (fp.scale * w / 1000)
    expected = stochastic_round(scaled, np.random.default_rng(seed + 1)) % (1 << 32)
    encoded = fp.encode(x, weight, np.random.default_rng(seed + 1))
    assert encoded.dtype == np.uint32 and encoded.size == 302
    np.testing.assert_array_equal(encoded[:-1].astype(np.int64), expected)
    assert encoded[-1] == w


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.3)
    rounded = stochastic_round(x, rng)
    assert set(np.unique(rounded)) == {0, 1}
    assert abs(rounded.mean() - 0.3) < 0.005


def test_centered_lift() -> None:
    values = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=np.uint32)
    np.testing.assert_array_equal(centered(values), [0, 1, 2**31 - 1, -(2**31), -1])


class _RoundsAway:
    """A randomness source under which stochastic rounding always moves away from zero.

    u = 0 makes every fractional part round up (the largest positive code), u = 1 makes
    none do (the most negative code): the worst case a device's rounding can produce.
    """

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.u)


def _largest_cohort(clip: float, max_weight: int) -> int:
    """The largest n the encoding accepts (FixedPoint.for_round raises beyond), by bisection."""
    low, high = 1, 1 << 40
    while high - low > 1:
        mid = (low + high) // 2
        try:
            FixedPoint.for_round(clip, mid, max_weight)
            low = mid
        except ValueError:
            high = mid
    return low


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("cohort", ["one", "largest"])
def test_fixed_point_worst_case_sum_of_n_updates_at_the_clip_decodes_to_n_c(
    sign: float, cohort: str
) -> None:
    """n devices each send +-C e_0 at the maximum weight, rounded away from zero: no wrap."""
    clip, max_weight = 10.0, 1000  # the server's defaults (--secagg-clip-norm, -max-weight)
    n = 1 if cohort == "one" else _largest_cohort(clip, max_weight)
    assert cohort == "one" or n > 1_000_000
    fp = FixedPoint.for_round(clip, n, max_weight)
    update = np.zeros(6, dtype=np.float32)
    update[0] = sign * clip  # exactly at the clip: the largest update a device can send
    one = fp.encode(update, max_weight, _RoundsAway(0.0 if sign > 0 else 1.0))  # type: ignore[arg-type]
    # the modular sum of n such uploads, as the server's uint32 accumulator computes it
    total = ((one.astype(np.uint64) * np.uint64(n)) % np.uint64(1 << 32)).astype(np.uint32)
    decoded, weights = fp.decode(total)
    expected = sign * n * clip
    # each device's rounding moves its code by less than one unit: less than n/s in all
    assert abs(decoded[0] - expected) <= n / fp.scale
    assert abs(decoded[0] - expected) <= 1e-2 * n * clip  # and the encoding is still useful
    assert np.all(decoded[1:] == 0)
    assert weights == pytest.approx(n)
