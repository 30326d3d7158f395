"""Client side of SecAgg+: keys, shares, the masked upload and the unmasking.

For one round a device

1. encodes its update as fixed-point uint32 (common/quantize.py), plus its weight;
2. makes two X25519 key pairs, signs them with its identity key and advertises them;
   checks the neighbours' signatures, the pinned identity keys and that its
   neighbour list is the graph every device computes from the participants;
3. Shamir-shares its mask key and a fresh self-mask seed b among its
   neighbours and itself, each share AES-GCM encrypted to its receiver;
4. uploads x + PRG(b) + sum over neighbours v of +-PRG(s_uv), mod 2^32;
5. answers the unmask request only if it is consistent (survivors and dropped
   disjoint, all of them neighbours that shared keys), revealing b-shares of
   survivors and mask-key shares of dropped devices, never both for a device,
   and only once per round.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.retry import retry_after_s
from client.storage import IdentityStore
from common.pb import federation_pb2 as pb
from common.quantize import FixedPoint
from common.secagg import (
    KeyPair,
    agree,
    decrypt_share,
    encrypt_share,
    generate_keypair,
    keys_message,
    neighbours,
    prg_uint32,
    sign_keys,
    split,
    verify_keys,
)
from common.secagg.crypto import mask_info, share_ad, share_key_info, share_point
from common.secagg.graph import graph_seed
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


@dataclass
class SecAggReport:
    encode_seconds: float = 0.0
    mask_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    unverifiable: int = 0


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
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.me = device_id
        self.identity = identity
        self.identities = identities
        self.task = task
        self.round_id = task.round_id
        self.timeout = timeout
        self.rng = rng or np.random.default_rng()
        self.report = SecAggReport()
        self._revealed = False
        self._keys: tuple[KeyPair, KeyPair, bytes] | None = None
        self.resends = 0
        self.fixed_point = fixed_point_of(task.secagg)
        self.min_contributors = task.secagg.min_contributors
        check_noise(task)

    def _call(self, method: str, request: object) -> object:
        """One phase call; after a lost answer, the same message again (with backoff).

        Phase calls are idempotent, so repeating one is safe; a RESOURCE_EXHAUSTED
        refusal is repeated after the wait it names.
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
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    wait = max(retry_after_s(err), delay) * random.uniform(1.0, 1.5)
            time.sleep(wait)
            delay = min(delay * 2, 2.0)
            self.resends += 1
        self.report.bytes_received += response.ByteSize()
        return response

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
        started = time.perf_counter()
        encoded = self.fixed_point.encode(update, num_examples, self.rng)
        self.report.encode_seconds = time.perf_counter() - started

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
        if k > max(self.task.secagg.degree, 1) or t < (k + 1) // 2 + 1 or t > k + 1:
            raise SecAggProtocolError(
                f"unsafe parameters from the server: degree {k}, threshold {t} "
                "(the threshold must be a majority of the degree + 1 share holders)"
            )
        peers = self._verified_neighbours(advertised, participants)

        # Shares of the mask key and of a fresh self-mask seed, for the neighbours and me.
        self_seed = os.urandom(32)
        holders = sorted([*peers, self.me])
        points = {h: share_point(participants, h) for h in holders}
        t = advertised.threshold
        key_shares = split(mask.private_bytes(), [points[h] for h in holders], t)
        seed_shares = split(self_seed, [points[h] for h in holders], t)
        share_info = share_key_info(self.round_id)
        outgoing = [
            pb.EncryptedShare(
                sender=self.me,
                receiver=v,
                ciphertext=encrypt_share(
                    agree(enc.private, peers[v].encryption_public_key, share_info),
                    encode_share(key_shares[points[v]]) + encode_share(seed_shares[points[v]]),
                    share_ad(self.round_id, self.me, v),
                ),
            )
            for v in sorted(peers)
        ]
        shared: pb.ShareKeysResponse = self._call(  # type: ignore[assignment]
            "ShareKeys", pb.ShareKeysRequest(round_id=self.round_id, shares=outgoing)
        )
        received: dict[str, tuple[int, int]] = {}
        unverifiable: list[str] = []
        for share in shared.shares:
            if share.sender not in peers or share.receiver != self.me:
                raise SecAggProtocolError(
                    f"server relayed a share from non-neighbour {share.sender}"
                )
            plain = decrypt_share(
                agree(enc.private, peers[share.sender].encryption_public_key, share_info),
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

        started = time.perf_counter()
        masked = self.mask(encoded, self_seed, mask, peers, shared_with_me)
        self.report.mask_seconds = time.perf_counter() - started + self.report.encode_seconds
        self._upload(masked)

        request: pb.UnmaskRequest = self._call(  # type: ignore[assignment]
            "GetUnmaskRequest", pb.GetUnmaskRequestRequest(round_id=self.round_id)
        )
        survivors, dropped = list(request.survivors), list(request.dropped)
        check_unmask_request(self.me, survivors, dropped, shared_with_me)
        if request.total_survivors < self.min_contributors:
            raise SecAggProtocolError(
                f"the sum holds {request.total_survivors} updates; its DP noise needs "
                f"{self.min_contributors}, so this device will not help unmask it"
            )
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
        try:
            self._call(
                "Unmask",
                pb.UnmaskSharesRequest(
                    round_id=self.round_id, shares=revealed, unverifiable=unverifiable
                ),
            )
        except grpc.RpcError as err:
            # The server already had enough shares and closed the round: nothing was lost.
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        return self.report

    def _verified_neighbours(
        self, advertised: pb.AdvertiseKeysResponse, participants: list[str]
    ) -> dict[str, pb.RoundKeys]:
        if self.me not in participants:
            raise SecAggProtocolError("the participant list does not include this device")
        expected = neighbours(
            participants, advertised.degree, graph_seed(self.round_id, participants)
        )[self.me]
        peers = {k.device_id: k for k in advertised.neighbours}
        if sorted(peers) != expected:
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
        """encoded + PRG(b) + sum over neighbours that shared keys of +-PRG(s_uv), mod 2^32."""
        n = encoded.size
        masked: np.ndarray = encoded + prg_uint32(self_seed, n)
        scratch = np.empty(n, dtype=np.uint32)
        info = mask_info(self.round_id)
        for v in sorted(shared_with_me):
            seed = agree(mask.private, peers[v].mask_public_key, info)
            if self.me < v:
                masked += prg_uint32(seed, n, scratch)
            else:
                masked -= prg_uint32(seed, n, scratch)
        return masked

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
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            self.resends += 1
            resent = True
        self.report.bytes_sent += len(data)
