"""Client side of SecAgg+: keys, shares, the masked upload and the unmasking.

For one round a device

1. encodes its update as fixed-point uint32 (common/quantize.py), plus its weight;
   refuses a round id it has run before (remembered in its store);
2. makes two X25519 key pairs, signs them with its identity key and advertises them;
   checks the neighbours' signatures, the pinned identity keys and that its
   neighbour list is the graph every device computes from the participants;
   refuses a cohort below its own minimum and a threshold below the
   malicious-model bound (common/secagg/graph.py);
3. Shamir-shares its mask key and a fresh self-mask seed b among its
   neighbours and itself, each share AES-GCM encrypted to its receiver and
   committed to (SHA-256) for the server; masks only if it then holds valid
   shares from at least t - 1 neighbours (|U2| >= t);
4. uploads x + PRG(b) + sum over neighbours v of +-PRG(s_uv), mod 2^32;
5. consistency check (Bonawitz et al. 2017, section 4): signs the survivor set the
   server announces and goes on only if, for every device whose secret it is
   about to reveal a share of, at least t of that device's share holders signed
   the very same set; every survivor neighbour must be one that shared keys;
6. reveals b-shares of survivors and mask-key shares of dropped devices, never
   both for a device, and only once per round.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.retry import retry_after_s
from client.storage import IdentityStore
from common.pb import federation_pb2 as pb
from common.quantize import FixedPoint
from common.rng import os_seeded_generator
from common.secagg import (
    KeyPair,
    agree,
    decrypt_share,
    encrypt_share,
    generate_keypair,
    keys_message,
    sign_keys,
    split,
    verify_keys,
)
from common.secagg.crypto import (
    apply_masks,
    mask_info,
    share_ad,
    share_commitment,
    share_key_info,
    share_point,
    survivors_message,
)
from common.secagg.graph import (
    DEFAULT_CORRUPT_FRACTION,
    graph_seed,
    neighbourhood,
    threshold_bound,
)
from common.secagg.shamir import SHARE_BYTES, decode_share, encode_share
from common.tensors import CHUNK_BYTES, iter_chunks

# A phase call that failed with one of these is sent again, byte for byte: the server
# answers a resend of the same message as it answered (or would answer) the first.
RESEND = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


class SecAggProtocolError(RuntimeError):
    """The server asked for something an honest device must refuse."""


@dataclass(frozen=True)
class SecAggPolicy:
    """What this device demands of a secure round, whatever the server asks."""

    # A sum of two updates reveals each to the other's owner; of very few, almost as much.
    min_cohort: int = 5
    # The fraction of devices it assumes hostile when it checks the threshold.
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION

    def __post_init__(self) -> None:
        if self.min_cohort < 2:
            raise ValueError("the minimum secure-aggregation cohort is at least 2")
        if not 0 <= self.corrupt_fraction < 0.5:
            raise ValueError("the assumed corrupt fraction must be in [0, 0.5)")


@dataclass
class SecAggReport:
    encode_seconds: float = 0.0
    mask_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    # Set when the server answered that the round already completed with this device's
    # update in its sum (GetUnmaskRequest or Unmask): the version it produced.
    completed_version: int = 0
    unverifiable: int = 0
    # The consistency check: its bytes and the device's time verifying signatures.
    confirm_bytes: int = 0
    confirm_seconds: float = 0.0


def check_unmask_request(
    me: str, survivors: list[str], dropped: list[str], shared_with_me: set[str]
) -> None:
    """Refuse an unmask request that could reveal both secrets of a device."""
    s, d = set(survivors), set(dropped)
    if len(s) != len(survivors) or len(d) != len(dropped):
        raise SecAggProtocolError("unmask request lists a device twice")
    if s & d:
        raise SecAggProtocolError(
            f"unmask request names {sorted(s & d)[0]} as both survivor and dropped"
        )
    if me not in s:
        raise SecAggProtocolError("unmask request does not list this device as a survivor")
    unknown = (s | d) - shared_with_me - {me}
    if unknown:
        raise SecAggProtocolError(
            f"unmask request names {sorted(unknown)[0]}, which did not share keys with this device"
        )


def fixed_point_of(cfg: pb.SecAggConfig) -> FixedPoint:
    """The round's encoding as the server sent it."""
    return FixedPoint(
        cfg.clip_norm,
        cfg.scale,
        cfg.num_selected,
        cfg.max_weight,
        noise_variance=cfg.noise_variance,
        dimension=cfg.dimension,
        indicator_scale=cfg.indicator_scale,
    )


def check_noise(task: pb.Task) -> None:
    """With distributed DP, refuse a task whose noise falls short of its own promise.

    The task states z and n_min (UserDpConfig); its encoding must add at least
    (z Delta)^2 / n_min per device, Delta the encoding's L2 bound
    (`FixedPoint.sensitivity`), for the sum of any n_min uploads to carry that noise.
    """
    user_dp, cfg = task.privacy.user_dp, task.secagg
    if user_dp.mechanism != pb.USER_DP_SKELLAM:
        return
    if cfg.min_contributors < 1 or cfg.min_contributors != user_dp.min_contributors:
        raise SecAggProtocolError("distributed DP task without a consistent min_contributors")
    if cfg.clip_norm > user_dp.clip_norm or cfg.max_weight != 1 or cfg.dimension < 1:
        raise SecAggProtocolError("distributed DP task with a clip or weight above its promise")
    if cfg.indicator_scale and (cfg.indicator_scale < 0 or user_dp.clip_count_noise <= 0):
        raise SecAggProtocolError("adaptive clipping task without its count noise")
    needed = (
        user_dp.noise_multiplier * fixed_point_of(cfg).sensitivity
    ) ** 2 / cfg.min_contributors
    if user_dp.noise_multiplier <= 0 or cfg.noise_variance < needed * (1 - 1e-9):
        raise SecAggProtocolError(
            f"distributed DP task adds noise of variance {cfg.noise_variance:.4g} per device, "
            f"below the {needed:.4g} its noise multiplier promises; refusing"
        )


def mask_update(
    encoded: np.ndarray, self_seed: bytes, pairwise: list[tuple[bytes, int]]
) -> np.ndarray:
    """encoded + PRG(self_seed) + sum of sign x PRG(seed) over `pairwise`, mod 2^32 (a copy).

    All masks are expanded and added block by block while in cache (`apply_masks`):
    the same vector as expanding each 1M-element mask and adding it, in ~0.6x the time
    (one pass over the vector instead of two per neighbour).
    """
    masked = np.array(encoded, dtype="<u4", copy=True)
    return apply_masks(masked, [(self_seed, 1), *pairwise])


class DeviceStoppingError(RuntimeError):
    """The device was asked to stop while a secure-aggregation call waited to be resent."""


class SecAggDevice:
    """Runs the secure-aggregation phases of one round for one device."""

    def __init__(
        self,
        stub: object,
        metadata: tuple[tuple[str, str], ...],
        device_id: str,
        identity: Ed25519PrivateKey,
        identities: IdentityStore,
        task: pb.Task,
        timeout: Callable[[], float],
        rng: np.random.Generator | None = None,
        policy: SecAggPolicy | None = None,
        compute: AbstractContextManager[object] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.stub = stub
        # The device's stop event: a resend waits on it, so a device asked to stop while
        # the server is away leaves now instead of retrying until the phase times out.
        self.stop = stop if stop is not None else threading.Event()
        # Held while encoding, and while masking and uploading: devices that share a
        # process (a simulation) take turns at those, so that not all hold their
        # model-sized buffers at once (client.runtime.SharedHost).
        self.compute = compute if compute is not None else nullcontext()
        self.metadata = metadata
        self.me = device_id
        self.identity = identity
        self.identities = identities
        self.task = task
        self.round_id = task.round_id
        self.timeout = timeout
        # Rounding and DP noise: a generator seeded from the OS CSPRNG for this round.
        self.rng = rng or os_seeded_generator()
        self.policy = policy or SecAggPolicy()
        self.report = SecAggReport()
        self._revealed = False
        self._keys: tuple[KeyPair, KeyPair, bytes] | None = None
        self._dealt = False  # shares of this round's secrets were made: never run it again
        self.resends = 0
        self.graph: dict[str, list[str]] = {}
        self.fixed_point = fixed_point_of(task.secagg)
        self.min_contributors = task.secagg.min_contributors
        check_noise(task)

    def _call(self, method: str, request: object) -> object:
        """One phase call; after a lost answer, the same message again (with backoff).

        Phase calls are idempotent, so repeating one is safe; a refusal that names a
        wait (RESOURCE_EXHAUSTED, UNAVAILABLE while the server's database is away) is
        repeated after it.
        """
        give_up = time.monotonic() + self.timeout()
        delay = 0.1
        while True:
            self.report.bytes_sent += request.ByteSize()  # type: ignore[attr-defined]
            try:
                response = getattr(self.stub, method)(
                    request, metadata=self.metadata, timeout=self.timeout()
                )
                break
            except grpc.RpcError as err:
                if err.code() not in RESEND or time.monotonic() + delay > give_up:
                    raise
                wait = delay * random.uniform(0.5, 1.0)
                if hint := retry_after_s(err):
                    wait = max(hint, delay) * random.uniform(1.0, 1.5)
            self._pause(wait)
            delay = min(delay * 2, 2.0)
            self.resends += 1
        self.report.bytes_received += response.ByteSize()
        return response

    def _pause(self, seconds: float) -> None:
        """Wait before a resend; DeviceStoppingError if the device is asked to stop meanwhile."""
        if self.stop.wait(seconds):
            raise DeviceStoppingError(
                "the device is stopping; the round goes on without it (dropout recovery)"
            )

    def round_keys(self) -> tuple[KeyPair, KeyPair, bytes]:
        """The device's keys for the round and their signature, made once per round."""
        if self._keys is None:
            enc, mask = generate_keypair(), generate_keypair()
            signature = sign_keys(
                self.identity, keys_message(self.round_id, self.me, enc.public, mask.public)
            )
            self._keys = (enc, mask, signature)
        return self._keys

    def run(self, update: np.ndarray, num_examples: int) -> SecAggReport:
        if self.fixed_point.noise_variance > 0 and update.size != self.fixed_point.dimension:
            raise SecAggProtocolError("the DP noise was sized for another update length")
        with self.compute:
            started = time.perf_counter()
            encoded = self.fixed_point.encode(update, num_examples, self.rng)
            self.report.encode_seconds = time.perf_counter() - started
        if self._dealt:
            raise SecAggProtocolError(
                f"round {self.round_id}: this device already dealt its shares; it will not "
                "run the round again"
            )
        # A resume of this very run (the device went back to CheckIn before its keys were
        # answered) is not a replay: only a new run of a known round id is refused.
        if self._keys is None and not self.identities.remember_round(self.round_id):
            raise SecAggProtocolError(
                f"round id {self.round_id} was already run by this device; refusing a "
                "replayed round"
            )

        enc, mask, signature = self.round_keys()
        advertised: pb.AdvertiseKeysResponse = self._call(  # type: ignore[assignment]
            "AdvertiseKeys",
            pb.AdvertiseKeysRequest(
                round_id=self.round_id,
                keys=pb.RoundKeys(
                    device_id=self.me,
                    encryption_public_key=enc.public,
                    mask_public_key=mask.public,
                    signature=signature,
                ),
            ),
        )
        participants = sorted(advertised.participants)
        k, t = advertised.degree, advertised.threshold
        self._check_parameters(participants, k, t)
        peers = self._verified_neighbours(advertised, participants)

        # Shares of the mask key and of a fresh self-mask seed, for the neighbours and me.
        self._dealt = True
        self_seed = os.urandom(32)
        holders = sorted([*peers, self.me])
        points = {h: share_point(participants, h) for h in holders}
        t = advertised.threshold
        key_shares = split(mask.private_bytes(), [points[h] for h in holders], t)
        seed_shares = split(self_seed, [points[h] for h in holders], t)
        share_info = share_key_info(self.round_id)
        # One key agreement per neighbour: the key that encrypts my share to v also
        # opens v's share to me (X25519 is symmetric, the context is the same).
        share_keys = {
            v: agree(enc.private, peers[v].encryption_public_key, share_info) for v in peers
        }
        outgoing = [
            pb.EncryptedShare(
                sender=self.me,
                receiver=v,
                ciphertext=encrypt_share(
                    share_keys[v],
                    encode_share(key_shares[points[v]]) + encode_share(seed_shares[points[v]]),
                    share_ad(self.round_id, self.me, v),
                ),
            )
            for v in sorted(peers)
        ]
        commitments = [
            pb.ShareCommitment(
                holder=h,
                mask_key=share_commitment(
                    self.round_id,
                    self.me,
                    h,
                    pb.SHARE_KIND_MASK_KEY,
                    encode_share(key_shares[points[h]]),
                ),
                self_mask_seed=share_commitment(
                    self.round_id,
                    self.me,
                    h,
                    pb.SHARE_KIND_SELF_MASK_SEED,
                    encode_share(seed_shares[points[h]]),
                ),
            )
            for h in holders
        ]
        shared: pb.ShareKeysResponse = self._call(  # type: ignore[assignment]
            "ShareKeys",
            pb.ShareKeysRequest(round_id=self.round_id, shares=outgoing, commitments=commitments),
        )
        received: dict[str, tuple[int, int]] = {}
        unverifiable: list[str] = []
        for share in shared.shares:
            if share.sender not in peers or share.receiver != self.me:
                raise SecAggProtocolError(
                    f"server relayed a share from non-neighbour {share.sender}"
                )
            plain = decrypt_share(
                share_keys[share.sender],
                share.ciphertext,
                share_ad(self.round_id, share.sender, self.me),
            )
            try:
                if plain is None or len(plain) != 2 * SHARE_BYTES:
                    raise ValueError("share failed authentication")
                received[share.sender] = (
                    decode_share(plain[:SHARE_BYTES]),
                    decode_share(plain[SHARE_BYTES:]),
                )
            except ValueError:
                # Tampered, forged or malformed: never reveal anything for this sender.
                unverifiable.append(share.sender)
        self.report.unverifiable = len(unverifiable)
        shared_with_me = {s.sender for s in shared.shares}
        if len(received) + 1 < t:
            # Masked with fewer partners, the upload could be unmasked with the shares of b
            # alone: the server withheld shares (Bonawitz et al.'s |U2| >= t check).
            raise SecAggProtocolError(
                f"only {len(received)} neighbours sent this device valid shares; masking "
                f"needs {t - 1} (|U2| >= t = {t}), so this device will not upload"
            )

        with self.compute:
            started = time.perf_counter()
            masked = self.mask(encoded, self_seed, mask, peers, shared_with_me)
            self.report.mask_seconds = time.perf_counter() - started + self.report.encode_seconds
            del encoded
            self._upload(masked)
            del masked

        request: pb.UnmaskRequest = self._call(  # type: ignore[assignment]
            "GetUnmaskRequest", pb.GetUnmaskRequestRequest(round_id=self.round_id)
        )
        if request.round_completed:
            # The others' shares sufficed and the round closed with this update in its sum.
            self.report.completed_version = request.completed_version
            return self.report
        survivors, dropped = list(request.survivors), list(request.dropped)
        check_unmask_request(self.me, survivors, dropped, shared_with_me)
        everyone = self._check_survivor_set(request, participants, peers, shared_with_me)
        if len(everyone) < self.min_contributors:
            raise SecAggProtocolError(
                f"the sum holds {len(everyone)} updates; its DP noise needs "
                f"{self.min_contributors}, so this device will not help unmask it"
            )
        owners = {self.me, *(v for v in survivors + dropped if v in received)}
        if not self._confirm(everyone, participants, peers, owners, t):
            return self.report  # the round completed with this update: nothing to reveal
        if self._revealed:
            raise SecAggProtocolError("shares of this round were already revealed once")
        self._revealed = True
        revealed = [
            pb.RevealedShare(
                owner=self.me,
                kind=pb.SHARE_KIND_SELF_MASK_SEED,
                share=encode_share(seed_shares[points[self.me]]),
            )
        ]
        for v in survivors:
            if v != self.me and v in received:
                revealed.append(
                    pb.RevealedShare(
                        owner=v,
                        kind=pb.SHARE_KIND_SELF_MASK_SEED,
                        share=encode_share(received[v][1]),
                    )
                )
        for v in dropped:
            if v in received:
                revealed.append(
                    pb.RevealedShare(
                        owner=v, kind=pb.SHARE_KIND_MASK_KEY, share=encode_share(received[v][0])
                    )
                )
        answer: pb.UnmaskSharesResponse = self._call(  # type: ignore[assignment]
            "Unmask",
            pb.UnmaskSharesRequest(
                round_id=self.round_id, shares=revealed, unverifiable=unverifiable
            ),
        )
        if answer.round_completed:
            self.report.completed_version = answer.completed_version
        return self.report

    def _check_parameters(self, participants: list[str], k: int, t: int) -> None:
        """The cohort and threshold this device accepts, whatever the server proposes."""
        n = len(participants)
        if len(set(participants)) != n:
            raise SecAggProtocolError("the participant list names a device twice")
        if n < self.policy.min_cohort:
            raise SecAggProtocolError(
                f"the secure round has {n} participants, below this device's minimum of "
                f"{self.policy.min_cohort} (--min-secagg-cohort): a sum of so few updates "
                "reveals too much of each"
            )
        if k > max(self.task.secagg.degree, 1) or k < 1 or k > n - 1:
            raise SecAggProtocolError(f"unsafe degree {k} from the server for {n} participants")
        bound = threshold_bound(n, k, self.policy.corrupt_fraction)
        if t < bound or t > k + 1:
            raise SecAggProtocolError(
                f"unsafe threshold {t} from the server: with {n} participants, degree {k} "
                f"and up to a fraction {self.policy.corrupt_fraction:g} of hostile devices "
                f"this device needs at least {bound} (more than half of the {k + 1} share "
                "holders plus the hostile ones among them)"
            )

    def _check_survivor_set(
        self,
        request: pb.UnmaskRequest,
        participants: list[str],
        peers: dict[str, pb.RoundKeys],
        shared_with_me: set[str],
    ) -> list[str]:
        """The round's survivor set, if it agrees with everything this device knows."""
        everyone = list(request.round_survivors)
        if everyone != sorted(set(everyone)):
            raise SecAggProtocolError("the survivor set is not a sorted list of distinct ids")
        if self.me not in everyone:
            raise SecAggProtocolError("the survivor set does not include this device")
        if not set(everyone) <= set(participants):
            raise SecAggProtocolError("the survivor set names devices that did not advertise keys")
        if len(everyone) < self.policy.min_cohort:
            raise SecAggProtocolError(
                f"the sum would hold {len(everyone)} updates, below this device's minimum of "
                f"{self.policy.min_cohort} (--min-secagg-cohort); refusing to unmask it"
            )
        if request.total_survivors != len(everyone):
            raise SecAggProtocolError("the unmask request's count disagrees with the survivor set")
        stray = sorted((set(everyone) & set(peers)) - shared_with_me)
        if stray:
            # Bonawitz et al.'s U3 within U2: a survivor I hold no mask with would let the
            # server strip every mask I did add by calling my real partners dropped.
            raise SecAggProtocolError(
                f"the survivor set names {stray[0]}, which did not share keys with this device"
            )
        survivors = sorted({self.me} | (shared_with_me & set(everyone)))
        dropped = sorted(shared_with_me - set(everyone))
        if list(request.survivors) != survivors or list(request.dropped) != dropped:
            raise SecAggProtocolError(
                "the unmask request's survivors and dropped disagree with the survivor set"
            )
        return everyone

    def _confirm(
        self,
        everyone: list[str],
        participants: list[str],
        peers: dict[str, pb.RoundKeys],
        owners: set[str],
        t: int,
    ) -> bool:
        """Consistency check: t holders of each secret I reveal for signed this very set.

        False when the server answers that the round already completed with this device's
        update in its sum: then it reveals nothing.
        """
        message = survivors_message(
            self.round_id, self.task.model_name, self.task.model_version, everyone
        )
        request = pb.ConfirmSurvivorsRequest(
            round_id=self.round_id, signature=sign_keys(self.identity, message)
        )
        # Late confirmations are accepted while the round unmasks; once the sum is unmasked
        # the server answers round_completed (or "closed" if the round failed: an error).
        response: pb.ConfirmSurvivorsResponse = self._call(  # type: ignore[assignment]
            "ConfirmSurvivors", request
        )
        self.report.confirm_bytes = request.ByteSize() + response.ByteSize()
        if response.round_completed:
            self.report.completed_version = response.completed_version
            return False
        started = time.thread_time()  # CPU: devices share cores in simulations
        known = {d: k.identity_public_key for d, k in peers.items()}
        known[self.me] = self._my_identity_key()
        signed: set[str] = set()
        strangers: dict[str, bytes] = {}
        for entry in response.signatures:
            d = entry.device_id
            if d not in participants or d in signed:
                raise SecAggProtocolError(f"unexpected survivor-set signature from {d}")
            if d in known and entry.identity_public_key != known[d]:
                raise SecAggProtocolError(f"the identity key relayed for {d} has changed")
            if not verify_keys(entry.identity_public_key, message, entry.signature):
                raise SecAggProtocolError(
                    f"the signature of {d} is not over the survivor set this device was given: "
                    "the server told devices different stories"
                )
            if d not in known:
                strangers[d] = entry.identity_public_key
            signed.add(d)
        changed = self.identities.pin(strangers)
        if changed:
            raise SecAggProtocolError(
                f"identity key of {changed[0]} differs from the one pinned earlier"
            )
        confirmed = signed & set(everyone)
        for v in sorted(owners):
            holders = {v, *self.graph[v]}
            if len(holders & confirmed) < t:
                raise SecAggProtocolError(
                    f"only {len(holders & confirmed)} holders of shares of {v} confirmed the "
                    f"survivor set this device was given; {t} needed before revealing anything"
                )
        self.report.confirm_seconds = time.thread_time() - started
        return True

    def _my_identity_key(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self.identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _verified_neighbours(
        self, advertised: pb.AdvertiseKeysResponse, participants: list[str]
    ) -> dict[str, pb.RoundKeys]:
        if self.me not in participants:
            raise SecAggProtocolError("the participant list does not include this device")
        # My row and my neighbours' (the holders of the secrets I may reveal shares of).
        self.graph = neighbourhood(
            participants, advertised.degree, graph_seed(self.round_id, participants), self.me
        )
        expected = self.graph[self.me]
        peers = {k.device_id: k for k in advertised.neighbours}
        if len(peers) != len(advertised.neighbours) or sorted(peers) != expected:
            raise SecAggProtocolError("the server's neighbour list is not the round's graph")
        for k in peers.values():
            message = keys_message(
                self.round_id, k.device_id, k.encryption_public_key, k.mask_public_key
            )
            if not verify_keys(k.identity_public_key, message, k.signature):
                raise SecAggProtocolError(f"round keys of {k.device_id} carry a bad signature")
        changed = self.identities.pin({d: k.identity_public_key for d, k in peers.items()})
        if changed:
            raise SecAggProtocolError(
                f"identity key of {changed[0]} differs from the one pinned earlier; "
                "refusing keys the server may have substituted"
            )
        return peers

    def mask(
        self,
        encoded: np.ndarray,
        self_seed: bytes,
        mask: KeyPair,
        peers: dict[str, pb.RoundKeys],
        shared_with_me: set[str],
    ) -> np.ndarray:
        """encoded + PRG(b) + sum over neighbours that shared keys of +-PRG(s_uv), mod 2^32.

        One pass over the update (`mask_update`: every keystream added block by block
        while the block is in cache) instead of one full-length expansion and addition
        per mask: 16 -> 10 ms for the intent model's 400k values and 47 masks.
        """
        info = mask_info(self.round_id)
        pairwise = [
            (agree(mask.private, peers[v].mask_public_key, info), 1 if self.me < v else -1)
            for v in sorted(shared_with_me)
        ]
        return mask_update(encoded, self_seed, pairwise)

    def _upload(self, masked: np.ndarray) -> None:
        data = masked.astype("<u4", copy=False).tobytes()

        def messages() -> Iterator[pb.MaskedChunk]:
            yield pb.MaskedChunk(
                header=pb.MaskedHeader(
                    round_id=self.round_id, total_elements=masked.size, total_bytes=len(data)
                )
            )
            for chunk in iter_chunks(data, CHUNK_BYTES):
                yield pb.MaskedChunk(data=chunk)

        give_up = time.monotonic() + self.timeout()
        delay = 0.1
        resent = False
        while True:
            try:
                self.stub.UploadMasked(  # type: ignore[attr-defined]
                    messages(), metadata=self.metadata, timeout=self.timeout()
                )
                break
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.ALREADY_EXISTS and resent:
                    break  # the first stream was accepted; its answer was lost
                if err.code() not in RESEND or time.monotonic() + delay > give_up:
                    raise
            self._pause(delay)
            delay = min(delay * 2, 2.0)
            self.resends += 1
            resent = True
        self.report.bytes_sent += len(data)
