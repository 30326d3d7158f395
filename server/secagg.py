"""Server side of SecAgg+ for one round: relay keys and shares, sum masked inputs, unmask.

Phases (Bonawitz et al. CCS 2017, with the sparse graph of Bell et al. CCS 2020):

    ADVERTISE  devices send signed X25519 round keys       -> U1, the graph over U1
    SHARE      devices send encrypted Shamir shares          -> U2
    UPLOAD     devices stream masked uint32 vectors          -> U3, running sum mod 2^32
    CONFIRM    devices sign the survivor set U3; each gets   -> U4 (the malicious-server
               the signatures of its two-hop neighbourhood      consistency check)
    UNMASK     devices of U4 reveal b-shares of survivors    -> U5, reconstruct, remove masks
               and mask-key shares of dropped neighbours
    DONE / FAILED

A phase closes when every device still in the protocol has answered, or at
its deadline; a phase left with fewer than `threshold` devices fails the
round. The server only ever holds masked vectors and their running sum: an
upload is held whole (so a broken stream can be discarded), then added modulo
2^32 in place, chunk by chunk, and masks are removed from the sum only.
`recorder`, when given, sees every vector the aggregation path receives or
stores (the tests use it to show none is an individual update).

Against hostile devices: every dealt share is committed to (SHA-256) by its
dealer in ShareKeys, and a revealed share that does not match its commitment
is dropped and its sender named on the audit log, so a crafted share cannot
shift a rebuilt secret; a rebuilt mask key must match the public key its owner
advertised; the weight element of the sum is read as a signed integer and must
lie in [survivors, survivors x max_weight].

Nothing here knows about gRPC; errors are FederationError with a kind.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.quantize import FixedPoint, centered
from common.secagg import agree, combine, neighbours, verify_keys
from common.secagg.crypto import (
    COMMITMENT_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    apply_masks,
    keys_message,
    mask_info,
    share_commitment,
    share_point,
    survivors_message,
    x25519_public,
)
from common.secagg.graph import DEFAULT_CORRUPT_FRACTION, graph_seed, threshold_bound
from common.secagg.shamir import SHARE_BYTES, decode_share, encode_share
from server.errors import ErrorKind, FederationError
from server.faults import crash_point

log = logging.getLogger("xeno.server.secagg")
audit = logging.getLogger("xeno.audit")

SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES  # mask-key share || self-mask-seed share
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES
KEY_BYTES = 32


class Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    UPLOAD = "upload"
    CONFIRM = "confirm"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


class ShareKind(enum.Enum):
    SELF_MASK_SEED = 1
    MASK_KEY = 2


@dataclass(frozen=True)
class DeviceKeys:
    device_id: str
    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    identity_public_key: bytes


@dataclass(frozen=True)
class SecAggSettings:
    threshold: int
    degree: int
    fixed_point: FixedPoint
    phase_timeout_s: float
    # Distributed DP: fewer uploads than this carry less noise than promised; never unmask.
    min_uploads: int = 0
    # The malicious model: fraction of devices that may be hostile (graph.threshold_bound).
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION


@dataclass
class SecAggResult:
    weighted_sum: np.ndarray
    weight_sum: float
    survivors: list[str]
    dropped: list[str]
    indicator_sum: float | None = None  # adaptive clipping: noisy count inside the clip


@dataclass
class _Unmasking:
    survivors: list[str]
    dropped: list[str]


@dataclass
class SecAggRound:
    """State of the secure aggregation of one round (guarded by the coordinator's lock)."""

    round_id: str
    cohort: list[str]
    identity_keys: dict[str, bytes]
    settings: SecAggSettings
    vector_length: int
    advertise_deadline: float
    target: int
    recorder: Callable[[str, np.ndarray], None] | None = None
    model_name: str = ""
    model_version: int = 0
    phase: Phase = Phase.ADVERTISE
    phase_deadline: float = 0.0
    failure: str = ""
    keys: dict[str, DeviceKeys] = field(default_factory=dict)
    participants: list[str] = field(default_factory=list)
    graph: dict[str, list[str]] = field(default_factory=dict)
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # (owner, holder, kind) -> the owner's commitment to that share
    commitments: dict[tuple[str, str, ShareKind], bytes] = field(default_factory=dict)
    u2: list[str] = field(default_factory=list)
    uploading: set[str] = field(default_factory=set)
    uploaded: list[str] = field(default_factory=list)
    accumulator: np.ndarray | None = None
    requests: dict[str, _Unmasking] = field(default_factory=dict)
    survivor_set: list[str] = field(default_factory=list)
    confirmations: dict[str, bytes] = field(default_factory=dict)
    # Consistency check: per secret the unmasking needs, how many of its holders confirmed.
    confirmed_holders: dict[str, int] = field(default_factory=dict)
    # (holder, owner, kind) of every revealed share that failed its commitment
    bad_shares: list[tuple[str, str, ShareKind]] = field(default_factory=list)
    threshold: int = 0
    revealed: dict[str, list[tuple[str, ShareKind, int]]] = field(default_factory=dict)
    # Each device's accepted Unmask message, to answer a resend of it (a lost answer).
    reveal_messages: dict[str, tuple[tuple[str, ShareKind, bytes], ...]] = field(
        default_factory=dict
    )
    result: SecAggResult | None = None
    withdrawn: set[str] = field(default_factory=set)
    share_counts: dict[tuple[str, ShareKind], int] = field(default_factory=dict)
    phase_started: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    unmask_cpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.phase_deadline = self.advertise_deadline
        self.threshold = self.settings.threshold

    # ------------------------------------------------------------------ helpers
    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)

    def _require_phase(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"{what} is not accepted in the {self.phase.value} phase of round {self.round_id}",
            )

    def _record(self, label: str, vector: np.ndarray) -> None:
        if self.recorder is not None:
            self.recorder(label, vector.copy())

    def withdraw(self, device: str) -> None:
        """A device declined or left: stop waiting for it."""
        self.withdrawn.add(device)

    # ------------------------------------------------------------------ phase 1
    def advertise(self, device: str, keys: DeviceKeys) -> None:
        known = self.keys.get(device)
        if known is not None and device in self.graph and _same_keys(known, keys):
            return  # a resend after a lost answer, once the phase closed: the same answer
        self._require_phase(Phase.ADVERTISE, "AdvertiseKeys")
        if device not in self.cohort:
            raise FederationError(ErrorKind.PERMISSION_DENIED, "device is not in this round")
        if keys.device_id != device:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "keys name another device")
        if len(keys.encryption_public_key) != KEY_BYTES or len(keys.mask_public_key) != KEY_BYTES:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "round public keys are 32 bytes each")
        if keys.encryption_public_key == keys.mask_public_key:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "the two round keys must differ")
        identity = self.identity_keys.get(device, b"")
        message = keys_message(
            self.round_id, device, keys.encryption_public_key, keys.mask_public_key
        )
        if not identity or not verify_keys(identity, message, keys.signature):
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                "round keys signature does not verify against the device's enrolled identity key",
            )
        if device in self.keys:
            if self.keys[device].signature != keys.signature:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS, "this device already advertised other round keys"
                )
            return
        self.keys[device] = DeviceKeys(
            device, keys.encryption_public_key, keys.mask_public_key, keys.signature, identity
        )

    def neighbour_keys(self, device: str) -> list[DeviceKeys]:
        if device not in self.graph:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"device did not advertise keys in time for round {self.round_id}",
            )
        return [self.keys[v] for v in self.graph[device]]

    # ------------------------------------------------------------------ phase 2
    def share(
        self,
        device: str,
        shares: dict[str, bytes],
        commitments: dict[str, tuple[bytes, bytes]] | None = None,
    ) -> None:
        if device in self.u2 and self._same_shares(device, shares, commitments or {}):
            return  # a resend after a lost answer, once the phase closed
        self._require_phase(Phase.SHARE, "ShareKeys")
        if device not in self.graph:
            raise FederationError(ErrorKind.PERMISSION_DENIED, "device is not a participant")
        expected = set(self.graph[device])
        unknown = sorted(set(shares) - expected)
        if unknown:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"shares for unknown peers (not neighbours): {', '.join(unknown[:5])}",
            )
        missing = sorted(expected - set(shares))
        if missing:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"missing shares for neighbours: {', '.join(missing[:5])}",
            )
        bad = [v for v, c in shares.items() if len(c) != SHARE_CIPHERTEXT_BYTES]
        if bad:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"encrypted shares must be {SHARE_CIPHERTEXT_BYTES} bytes (for {bad[0]})",
            )
        commitments = commitments or {}
        holders = expected | {device}
        if set(commitments) != holders:
            wrong = sorted(set(commitments) ^ holders)
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                "share commitments must name exactly the neighbours and the sender "
                f"(wrong or missing: {', '.join(wrong[:5])})",
            )
        if any(len(c) != COMMITMENT_BYTES for pair in commitments.values() for c in pair):
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT, f"share commitments are {COMMITMENT_BYTES} bytes"
            )
        if device in self.shares:
            if not self._same_shares(device, shares, commitments):
                raise FederationError(ErrorKind.ALREADY_EXISTS, "shares were already sent")
            return
        self.shares[device] = dict(shares)
        for holder, (mask_key, seed) in commitments.items():
            self.commitments[(device, holder, ShareKind.MASK_KEY)] = mask_key
            self.commitments[(device, holder, ShareKind.SELF_MASK_SEED)] = seed

    def _same_shares(
        self, device: str, shares: dict[str, bytes], commitments: dict[str, tuple[bytes, bytes]]
    ) -> bool:
        return self.shares.get(device) == shares and all(
            self.commitments.get((device, h, ShareKind.MASK_KEY)) == c[0]
            and self.commitments.get((device, h, ShareKind.SELF_MASK_SEED)) == c[1]
            for h, c in commitments.items()
        )

    def shares_for(self, device: str) -> list[tuple[str, bytes]]:
        if device not in self.u2:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"device did not share keys in time for round {self.round_id}",
            )
        return [(v, self.shares[v][device]) for v in self.graph[device] if v in self.shares]

    # ------------------------------------------------------------------ phase 3
    def begin_upload(self, device: str, total_elements: int) -> None:
        if device in self.uploaded:  # also after the phase: a resend after a lost answer
            raise FederationError(
                ErrorKind.ALREADY_EXISTS, "a masked update from this device was already accepted"
            )
        self._require_phase(Phase.UPLOAD, "UploadMasked")
        if device not in self.u2:
            raise FederationError(
                ErrorKind.PERMISSION_DENIED, "device did not complete ShareKeys in this round"
            )
        if device in self.uploading:
            raise FederationError(
                ErrorKind.ABORTED, "an upload from this device is in progress; retry later"
            )
        if total_elements != self.vector_length:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"masked vector has {total_elements} elements, the round needs "
                f"{self.vector_length} (model parameters + 1 weight)",
            )
        self.uploading.add(device)

    def end_upload(self, device: str, parts: list[np.ndarray] | None) -> None:
        """Add a complete staged upload (or forget an aborted one).

        The upload comes as consecutive uint32 parts (the chunks as received), added
        to the running sum in place, each where it belongs.
        """
        self.uploading.discard(device)
        if parts is None:
            return
        self._require_phase(Phase.UPLOAD, "UploadMasked")
        if sum(p.size for p in parts) != self.vector_length:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"masked vector has {sum(p.size for p in parts)} elements, the round needs "
                f"{self.vector_length}",
            )
        if self.recorder is not None:
            self._record(f"upload:{device}", np.concatenate(parts))
        if self.accumulator is None:
            self.accumulator = np.zeros(self.vector_length, dtype=np.uint32)
        offset = 0
        for part in parts:  # wraps modulo 2^32
            block = self.accumulator[offset : offset + part.size]
            np.add(block, part, out=block)
            offset += part.size
        self._record("sum", self.accumulator)
        self.uploaded.append(device)

    # ------------------------------------------------------------------ phase 4
    def unmask_request(self, device: str) -> _Unmasking:
        if device not in self.requests:
            if self.phase in (Phase.ADVERTISE, Phase.SHARE, Phase.UPLOAD):
                raise FederationError(ErrorKind.FAILED_PRECONDITION, "uploads are still open")
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                "no unmasking for this device: its masked update did not arrive in time",
            )
        return self.requests[device]

    # ------------------------------------------------------------------ consistency check
    def confirm(self, device: str, signature: bytes) -> None:
        """A survivor's signature over the survivor set (Bonawitz et al. 2017, section 4).

        Accepted late, during UNMASK, too: the check closes as soon as enough holders
        confirmed, and a slower honest device can still check and reveal its shares.
        """
        if self.confirmations.get(device) == signature:
            return  # a resend after a lost answer, also once the phase closed
        if self.phase is not Phase.UNMASK:
            self._require_phase(Phase.CONFIRM, "ConfirmSurvivors")
        self.unmask_request(device)
        message = survivors_message(
            self.round_id, self.model_name, self.model_version, self.survivor_set
        )
        if not verify_keys(self.identity_keys.get(device, b""), message, signature):
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                "the signature over the survivor set does not verify against the device's "
                "enrolled identity key",
            )
        if device in self.confirmations:
            if self.confirmations[device] != signature:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS, "this device already confirmed the survivor set"
                )
            return
        self.confirmations[device] = signature
        for v in (device, *self.graph[device]):
            if v in self.confirmed_holders:
                self.confirmed_holders[v] += 1

    def _confirm_ready(self) -> bool:
        """Every secret the sum needs has t holders that confirmed.

        Then each device's check can pass, so stragglers (devices that uploaded, then
        vanished) are not waited for.
        """
        t = self.threshold
        return all(count >= t for count in self.confirmed_holders.values())

    def confirmations_for(self, device: str) -> list[tuple[str, bytes, bytes]]:
        """(signer, signature, identity key) of the confirmed devices within two hops."""
        if device not in self.confirmations:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"device did not confirm the survivor set in time for round {self.round_id}",
            )
        near = {device, *self.graph[device]}
        for v in list(near):
            near.update(self.graph[v])
        return [
            (v, self.confirmations[v], self.identity_keys[v])
            for v in sorted(near)
            if v in self.confirmations
        ]

    # ------------------------------------------------------------------ phase 4
    def unmask(
        self, device: str, revealed: list[tuple[str, ShareKind, bytes]], unverifiable: list[str]
    ) -> None:
        if self.phase is Phase.DONE and device in self.confirmations:
            return  # the sum was already unmasked with other devices' shares
        self._require_phase(Phase.UNMASK, "Unmask")
        request = self.unmask_request(device)
        if device not in self.confirmations:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                "no unmasking for this device: it did not confirm the survivor set in time",
            )
        if device in self.revealed:
            if self.reveal_messages.get(device) == tuple(revealed):
                return  # the same shares again: a resend after a lost answer
            raise FederationError(ErrorKind.ALREADY_EXISTS, "shares were already revealed")
        wanted = {v: ShareKind.SELF_MASK_SEED for v in request.survivors}
        wanted.update({v: ShareKind.MASK_KEY for v in request.dropped})
        seen: set[str] = set()
        parsed: list[tuple[str, ShareKind, int]] = []
        for owner, kind, data in revealed:
            if owner in seen:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, f"two shares for {owner}")
            seen.add(owner)
            if wanted.get(owner) is not kind:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"share of {owner} of kind {kind.name} was not requested from this device",
                )
            try:
                parsed.append((owner, kind, decode_share(data)))
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        for sender in unverifiable:
            audit.warning(
                "round %s: device %s reports that the share from %s failed authentication",
                self.round_id,
                device,
                sender,
            )
        good: list[tuple[str, ShareKind, int]] = []
        for owner, kind, y in parsed:
            committed = self.commitments.get((owner, device, kind))
            digest = share_commitment(self.round_id, owner, device, kind.value, encode_share(y))
            if committed != digest:
                # A share its dealer never dealt: never let it into a reconstruction.
                audit.warning(
                    "round %s: device %s revealed a %s share of %s that does not match its "
                    "owner's commitment; discarded",
                    self.round_id,
                    device,
                    kind.name,
                    owner,
                )
                self.bad_shares.append((device, owner, kind))
                continue
            good.append((owner, kind, y))
        self.revealed[device] = good
        self.reveal_messages[device] = tuple(revealed)
        for owner, kind, _ in good:
            self.share_counts[(owner, kind)] = self.share_counts.get((owner, kind), 0) + 1

    def _unmask_ready(self) -> bool:
        """Every secret the sum needs has `threshold` shares: no need to wait for stragglers."""
        t = self.threshold
        uploaded = set(self.uploaded)
        dropped = {v for v in set(self.u2) - uploaded if uploaded.intersection(self.graph[v])}
        return all(
            self.share_counts.get((u, ShareKind.SELF_MASK_SEED), 0) >= t for u in self.uploaded
        ) and all(self.share_counts.get((v, ShareKind.MASK_KEY), 0) >= t for v in dropped)

    # ------------------------------------------------------------------ transitions
    def advance(self, now: float) -> bool:
        """Close the current phase when due; returns True when the phase changed."""
        if self.finished:
            return False
        active = [d for d in self._expected() if d not in self.withdrawn]
        answered = self._answered()
        complete = all(d in answered for d in active)
        if self.phase is Phase.ADVERTISE and len(self.keys) >= self.target:
            complete = True
        if self.phase is Phase.UNMASK and self._unmask_ready():
            complete = True
        if self.phase is Phase.CONFIRM and self._confirm_ready():
            complete = True
        if not complete and now < self.phase_deadline:
            return False
        if self.phase is Phase.UPLOAD and self.uploading and now < self.phase_deadline:
            return False  # an upload is mid-stream: give it until the deadline
        try:
            self._close_phase(now)
        except Exception as exc:
            # Anything unforeseen (no memory for the sum, a bug) fails the round: left
            # open, the phase would be closed again on every step and never end.
            log.exception("round %s: closing phase %s failed", self.round_id, self.phase.value)
            self._fail(f"closing phase {self.phase.value} failed: {type(exc).__name__}: {exc}")
        return True

    def _expected(self) -> list[str]:
        # Only the current phase's collection: advance() runs on every phase call, and
        # building all five for n devices each time made a round O(n^2).
        phase = self.phase
        if phase is Phase.ADVERTISE:
            return self.cohort
        if phase is Phase.SHARE:
            return self.participants
        if phase is Phase.UPLOAD:
            return self.u2
        if phase is Phase.CONFIRM:
            return list(self.requests)
        if phase is Phase.UNMASK:
            return list(self.confirmations)
        return []

    def _answered(self) -> Collection[str]:
        phase = self.phase
        if phase is Phase.ADVERTISE:
            return self.keys
        if phase is Phase.SHARE:
            return self.shares
        if phase is Phase.UPLOAD:
            return set(self.uploaded)
        if phase is Phase.CONFIRM:
            return self.confirmations
        if phase is Phase.UNMASK:
            return self.revealed
        return ()

    def _fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason
        log.warning("secure aggregation of round %s failed: %s", self.round_id, reason)

    def _close_phase(self, now: float) -> None:
        self.phase_seconds[self.phase.value] = (
            now - self.phase_started if self.phase_started else 0.0
        )
        self.phase_started = now
        t = self.threshold
        deadline = now + self.settings.phase_timeout_s
        if self.phase is Phase.ADVERTISE:
            self.participants = sorted(self.keys)
            if len(self.participants) < t:
                return self._fail(f"{len(self.participants)} devices advertised keys, {t} needed")
            degree = min(self.settings.degree, len(self.participants) - 1)
            # The bound for the cohort that did advertise (devices check the same one).
            bound = threshold_bound(len(self.participants), degree, self.settings.corrupt_fraction)
            self.threshold = min(max(self.threshold, bound), degree + 1)
            self.graph = neighbours(
                self.participants, degree, graph_seed(self.round_id, self.participants)
            )
            self.phase, self.phase_deadline = Phase.SHARE, deadline
        elif self.phase is Phase.SHARE:
            self.u2 = sorted(self.shares)
            if len(self.u2) < t:
                return self._fail(f"{len(self.u2)} devices shared keys, {t} needed")
            self.phase, self.phase_deadline = Phase.UPLOAD, deadline
        elif self.phase is Phase.UPLOAD:
            self.uploading.clear()
            survivors = set(self.uploaded)
            if len(survivors) < t:
                return self._fail(f"{len(survivors)} masked updates arrived, {t} needed")
            if len(survivors) < self.settings.min_uploads:
                return self._fail(
                    f"{len(survivors)} masked updates arrived; their DP noise needs "
                    f"{self.settings.min_uploads}, so the sum is never unmasked"
                )
            for u in sorted(survivors):
                near = [v for v in self.graph[u] if v in self.u2]
                self.requests[u] = _Unmasking(
                    survivors=sorted([u, *(v for v in near if v in survivors)]),
                    dropped=sorted(v for v in near if v not in survivors),
                )
            self.survivor_set = sorted(survivors)
            dropped_needed = {
                v for v in set(self.u2) - survivors if survivors.intersection(self.graph[v])
            }
            self.confirmed_holders = dict.fromkeys(survivors | dropped_needed, 0)
            self.phase, self.phase_deadline = Phase.CONFIRM, deadline
        elif self.phase is Phase.CONFIRM:
            if len(self.confirmations) < t:
                return self._fail(
                    f"{len(self.confirmations)} devices confirmed the survivor set, {t} needed"
                )
            self.phase, self.phase_deadline = Phase.UNMASK, deadline
            crash_point("unmask")
        elif self.phase is Phase.UNMASK:
            if len(self.revealed) < t:
                return self._fail(f"{len(self.revealed)} devices answered unmasking, {t} needed")
            cpu = time.thread_time()
            try:
                self.result = self._unmask_sum()
            except ValueError as exc:
                return self._fail(str(exc))
            finally:
                self.unmask_cpu_seconds = time.thread_time() - cpu
            self.phase = Phase.DONE
        return None

    def _unmask_sum(self) -> SecAggResult:
        assert self.accumulator is not None
        t = self.threshold
        survivors = sorted(self.uploaded)
        dropped = sorted(set(self.u2) - set(self.uploaded))
        collected: dict[tuple[str, ShareKind], dict[int, int]] = {}
        for holder, shares in self.revealed.items():
            x = share_point(self.participants, holder)
            for owner, kind, y in shares:
                collected.setdefault((owner, kind), {})[x] = y
        total = self.accumulator.copy()
        # Every mask to take back, as (seed, sign): expanded together, block by block
        # (apply_masks), once all are known to be sound.
        masks: list[tuple[bytes, int]] = []
        for u in survivors:
            points = collected.get((u, ShareKind.SELF_MASK_SEED), {})
            if len(points) < t:
                raise ValueError(
                    f"only {len(points)} shares of the self-mask seed of {u}, {t} needed"
                )
            masks.append((combine(points, t), -1))
        info = mask_info(self.round_id)
        for v in dropped:
            if not any(w in self.uploaded for w in self.graph[v]):
                continue  # no surviving neighbour added a mask shared with v
            points = collected.get((v, ShareKind.MASK_KEY), {})
            if len(points) < t:
                raise ValueError(f"only {len(points)} shares of the mask key of {v}, {t} needed")
            raw = combine(points, t)
            if x25519_public(raw) != self.keys[v].mask_public_key:
                raise ValueError(
                    f"the rebuilt mask key of {v} does not match the public key it advertised: "
                    "its dealt shares are inconsistent"
                )
            mask_key = X25519PrivateKey.from_private_bytes(raw)
            for w in self.graph[v]:
                if w not in self.uploaded:
                    continue
                seed = agree(mask_key, self.keys[w].mask_public_key, info)
                # w added +PRG when w < v and -PRG otherwise; take back what it added.
                masks.append((seed, -1 if w < v else 1))
        apply_masks(total, masks)
        self._record("unmasked-sum", total)
        fixed_point = self.settings.fixed_point
        weighted_sum, _unsigned_weight = fixed_point.decode(total)
        if fixed_point.indicator_scale:
            # The last element is the noisy clipped count; every upload weighs 1.
            inside = fixed_point.decode_indicator(total, len(survivors))
            return SecAggResult(weighted_sum, float(len(survivors)), survivors, dropped, inside)
        # Each honest weight element is in [1, W]: read the sum signed and bound it, so one
        # upload with a huge or negative weight cannot wrap the sum into a tiny divisor.
        weight_units = int(centered(total[-1:])[0])
        low, high = len(survivors), len(survivors) * fixed_point.max_weight
        if not low <= weight_units <= high:
            raise ValueError(
                f"the unmasked weight sum {weight_units} is outside [{low}, {high}] "
                f"({len(survivors)} uploads of weight 1..{fixed_point.max_weight}): an upload "
                "carries an out-of-range weight element"
            )
        return SecAggResult(weighted_sum, weight_units / fixed_point.max_weight, survivors, dropped)


def _same_keys(a: DeviceKeys, b: DeviceKeys) -> bool:
    return (
        a.encryption_public_key == b.encryption_public_key
        and a.mask_public_key == b.mask_public_key
        and a.signature == b.signature
    )
