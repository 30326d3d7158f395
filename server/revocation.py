"""Certificate revocation: which client certificates the server no longer accepts.

A revocation names a certificate by serial (`xeno-fl admin certs revoke
SERIAL`), or every certificate of a kind and name issued up to that moment
(`--device NAME`, `--admin NAME`: a certificate issued for the name later is
accepted, so re-provisioning a device is one `certs issue`; certificate times
have whole seconds, so one issued within the revocation's second is refused too). Revocations are
rows of `revoked_certificates` (audited); the server keeps them in memory,
applies one made through its Admin API at once, and reloads the table every
`refresh_s` seconds in a thread of its own, so one written directly to the
database (`--db`) takes effect within that time. The auth interceptor checks
the peer certificate of every call with one (server/services/common.py) and
never touches the database itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from common.certs import Identity

log = logging.getLogger("xeno.server.revocation")


@dataclass(frozen=True)
class Revocation:
    serial: str
    kind: str
    name: str
    reason: str
    revoked_at: datetime

    def matches(self, peer: Identity) -> bool:
        if self.serial:
            return peer.serial == self.serial
        if peer.kind is None or peer.kind.value != self.kind or peer.name != self.name:
            return False
        return peer.issued_at is None or peer.issued_at <= self.revoked_at


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Revocations:
    """The revocation list the interceptor checks (thread-safe snapshot)."""

    def __init__(
        self, load: Callable[[], Iterable[Revocation]] | None = None, refresh_s: float = 5.0
    ) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._by_serial: dict[str, Revocation] = {}
        self._by_name: dict[tuple[str, str], list[Revocation]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if load is not None:
            self.replace(load())

    def replace(self, items: Iterable[Revocation]) -> None:
        by_serial: dict[str, Revocation] = {}
        by_name: dict[tuple[str, str], list[Revocation]] = {}
        for r in items:
            r = Revocation(r.serial, r.kind, r.name, r.reason, _aware(r.revoked_at))
            if r.serial:
                by_serial[r.serial] = r
            else:
                by_name.setdefault((r.kind, r.name), []).append(r)
        with self._lock:
            self._by_serial, self._by_name = by_serial, by_name

    def add(self, r: Revocation) -> None:
        r = Revocation(r.serial, r.kind, r.name, r.reason, _aware(r.revoked_at))
        with self._lock:
            if r.serial:
                self._by_serial = {**self._by_serial, r.serial: r}
            else:
                key = (r.kind, r.name)
                self._by_name = {**self._by_name, key: [*self._by_name.get(key, []), r]}

    def revoked(self, peer: Identity) -> Revocation | None:
        """The revocation that refuses this certificate, or None."""
        by_serial, by_name = self._by_serial, self._by_name
        if peer.serial and peer.serial in by_serial:
            return by_serial[peer.serial]
        if peer.kind is not None:
            for r in by_name.get((peer.kind.value, peer.name), ()):
                if r.matches(peer):
                    return r
        return None

    def start(self) -> None:
        if self._load is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        load = self._load
        assert load is not None
        while not self._stop.wait(self._refresh_s):
            try:
                self.replace(load())
            except Exception as error:  # a database outage: keep the last list
                log.warning("could not reload the revocation list: %s", type(error).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
