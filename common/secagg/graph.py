"""The SecAgg+ neighbour graph and the choice of its degree k and threshold t.

Bell et al. (CCS 2020) replace SecAgg's complete graph by a random k-regular
graph with k = O(log n): each device masks with, and secret-shares to, only
its k neighbours, so device and server work grow like n log n, not n^2.
We use the Harary graph H(k, n) (each node joined to the k/2 nearest on
each side of a ring) with the ring ordered by SHA-256(seed || device id),
the seed a hash of the round id and the participant list: every device recomputes
the same graph and can check that the server told it the truth.

Each device shares its secrets among its k neighbours and itself (k + 1
holders). Parameters (derive_params): t = floor((k + 1) / 2) + 1, a strict
majority of the holders, so a server that collected the self-mask-seed
shares of a device from one set of holders and its mask-key shares from
another would need two disjoint majorities, which do not exist; honest
devices also refuse to reveal both kinds for one device. k is the
smallest even degree, at least 2 log2(n) (connectivity of the honest
subgraph, Bell et al. Thm 3.6), such that, with each device dropping
independently with probability `dropout`, the chance that some device has
fewer than t surviving neighbours (and the round fails) is at most
`failure_probability` (union bound over n devices, exact binomial tail).
With n <= k + 1 the graph is complete (plain SecAgg).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Defaults of the malicious model (docs/security.md). gamma: the fraction of a round's
# devices that may be the server's own or otherwise hostile; the threshold tolerates that
# many corrupt share holders except with probability 2^-SECURITY_BITS per device.
DEFAULT_CORRUPT_FRACTION = 0.05
SECURITY_BITS = 40


@dataclass(frozen=True)
class SecAggParams:
    degree: int
    threshold: int


def _binomial_tail_below(k: int, t: int, survive: float) -> float:
    """P[Binomial(k, survive) < t]."""
    return sum(math.comb(k, i) * survive**i * (1 - survive) ** (k - i) for i in range(t))


def corrupt_neighbours(n: int, degree: int, corrupt_fraction: float) -> int:
    """a: the most corrupt devices among one honest device's `degree` neighbours.

    floor(gamma n) of the n devices are corrupt. In the complete graph every one of
    them is a neighbour. In the relabelled Harary graph a device's neighbours are
    a uniformly random `degree`-subset of the other n - 1 (the ring order is a hash),
    so the count is hypergeometric; a is its 1 - 2^-SECURITY_BITS / n quantile
    (Bell et al., CCS 2020, section 4; the same rule as Google's fcp secagg
    parameter finder). Choosing the graph seed to beat that quantile means
    trying ~2^SECURITY_BITS round ids or participant lists.
    """
    corrupt = math.floor(corrupt_fraction * n + 1e-9)
    if degree >= n - 1 or corrupt == 0:
        return min(corrupt, degree)
    others = n - 1
    total = math.comb(others, degree)
    target = 2.0**-SECURITY_BITS / n
    tail = 0.0
    for a in range(min(corrupt, degree), -1, -1):
        p = math.comb(corrupt, a) * math.comb(others - corrupt, degree - a) / total
        if tail + p > target:
            return a
        tail += p
    return 0


def threshold_bound(n: int, degree: int, corrupt_fraction: float) -> int:
    """The smallest safe threshold: floor((k + 1 + a) / 2) + 1 of the k + 1 holders.

    An honest holder reveals one of a device's two secrets, never both; a corrupt
    one reveals both. The server gets both only if t <= |honest revealing one| + a
    for each, i.e. 2t <= k + 1 + a: so t = floor((k + 1 + a) / 2) + 1 leaves it
    one share short (Bonawitz et al. CCS 2017, section 6.2, for the complete graph:
    t > (n + corrupt) / 2; Bell et al. CCS 2020 for the sparse one).
    """
    a = corrupt_neighbours(n, degree, corrupt_fraction)
    return (degree + 1 + a) // 2 + 1


def derive_params(
    n: int,
    dropout: float = 0.1,
    failure_probability: float = 1e-6,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
) -> SecAggParams:
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 devices")
    if not 0 <= dropout < 0.5:
        raise ValueError("expected dropout must be in [0, 0.5)")
    if not 0 <= corrupt_fraction < 0.5:
        raise ValueError("the corrupt fraction must be in [0, 0.5)")
    k = max(2, 2 * math.ceil(math.log2(n)))
    k += k % 2
    while k < n - 1:
        t = threshold_bound(n, k, corrupt_fraction)
        if t <= k and n * _binomial_tail_below(k, t, 1 - dropout) <= failure_probability:
            return SecAggParams(degree=k, threshold=t)
        k += 2
    k = n - 1
    return SecAggParams(degree=k, threshold=min(threshold_bound(n, k, corrupt_fraction), n))


def graph_seed(round_id: str, participants: Sequence[str]) -> bytes:
    h = hashlib.sha256(b"xeno-fl/secagg/v1/graph\x00" + round_id.encode())
    for p in sorted(participants):
        h.update(b"\x00" + p.encode())
    return h.digest()


class _Harary:
    """The relabelled Harary graph H(degree, n) of one round, row by row."""

    def __init__(self, participants: Sequence[str], degree: int, seed: bytes) -> None:
        self.ids = sorted(participants)
        self.degree = degree
        n = len(self.ids)
        self.complete = n < 2 or degree >= n - 1
        # The relabelling orders devices by SHA-256(seed || id): portable to any language,
        # unlike a library RNG stream.
        self.ring = (
            []
            if self.complete
            else sorted(self.ids, key=lambda u: hashlib.sha256(seed + u.encode()).digest())
        )
        self.position = {u: i for i, u in enumerate(self.ring)}

    def rows(self, of: Sequence[str]) -> dict[str, list[str]]:
        wanted = sorted(set(of))
        if not set(wanted) <= set(self.ids):
            raise ValueError("rows asked of devices that are not participants")
        return {u: self.row(u) for u in wanted}

    def row(self, u: str) -> list[str]:
        if self.complete:
            return [v for v in self.ids if v != u]
        ring, n, i = self.ring, len(self.ring), self.position[u]
        half = self.degree // 2
        near = {ring[(i + j) % n] for j in range(1, half + 1)} | {
            ring[(i - j) % n] for j in range(1, half + 1)
        }
        if self.degree % 2:  # odd degree: also the node opposite on the ring (n even)
            near.add(ring[(i + n // 2) % n])
        return sorted(near)


def neighbours(
    participants: Sequence[str],
    degree: int,
    seed: bytes,
    of: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Each participant's neighbours in the relabelled Harary graph H(degree, n).

    With `of`, only those participants' rows (the same lists as in the whole graph): a
    device needs its own and its neighbours' (`neighbourhood`), k + 1 of the n rows.
    """
    graph = _Harary(participants, degree, seed)
    return graph.rows(graph.ids if of is None else of)


def neighbourhood(
    participants: Sequence[str], degree: int, seed: bytes, device: str
) -> dict[str, list[str]]:
    """The rows of `device` and of each of its neighbours: what one device checks.

    The same lists as `neighbours` without `of`, for k + 1 of the n rows: at n = 1,000
    (k = 82) about 2 ms instead of 17 per device and round. The ring is ordered once.
    """
    graph = _Harary(participants, degree, seed)
    own = graph.rows([device])[device]
    return graph.rows([device, *own])
