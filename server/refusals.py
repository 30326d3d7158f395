"""Refused requests in the audit chain, counted so that a flood cannot grow it without bound.

Each refused request class (authentication failed, permission denied, rate
limited, invalid argument on an admin RPC) is counted in memory per actor (a
verified admin or device, else the caller's address: a claimed identity is the
attacker's choice) and per window (`window_s`, one minute); when the window
closes, one audit row per class and actor says how many, which RPCs, and the
first reason. At most `max_actors` actors per class and window get rows of
their own; the rest share one row ("others"), so a minute adds at most
4 x (max_actors + 1) rows whatever the flood. `note` is cheap and never touches
the database (it runs on the event loop); a thread of its own writes closed
windows, and `flush(everything=True)` writes the open one too (before the audit
log is read, and when the server stops). A server killed mid-window loses that
window's counts (the `xeno.audit` log lines remain).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("xeno.server.refusals")

UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
RATE_LIMITED = "rate_limited"
INVALID_ARGUMENT = "invalid_argument"
CLASSES = (UNAUTHENTICATED, PERMISSION_DENIED, RATE_LIMITED, INVALID_ARGUMENT)
OTHERS = "others"
MAX_RPCS = 8

# (actor, action, target, details) rows for the audit log
Row = tuple[str, str, str, dict[str, Any]]


@dataclass
class _Count:
    count: int = 0
    reason: str = ""
    rpcs: dict[str, int] = field(default_factory=dict)
    actors: int = 0  # for the "others" row: how many actors it stands for
    seen: set[str] = field(default_factory=set)


class RefusalLog:
    def __init__(
        self,
        write: Callable[[list[Row]], None],
        window_s: float = 60.0,
        max_actors: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self._write = write
        self._window_s = window_s
        self._max_actors = max_actors
        self._clock = clock
        self._lock = threading.Lock()
        # window start -> class -> actor -> count
        self._windows: dict[float, dict[str, dict[str, _Count]]] = {}
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, cls: str, actor: str, rpc: str, reason: str) -> None:
        """Count one refusal (no I/O)."""
        now = self._clock()
        start = now - now % self._window_s
        rpc = rpc.rsplit("/", 1)[-1][:64]
        with self._lock:
            actors = self._windows.setdefault(start, {}).setdefault(cls, {})
            if actor not in actors and len(actors) >= self._max_actors:
                others = actors.setdefault(OTHERS, _Count())
                if actor not in others.seen and len(others.seen) < 10_000:
                    others.seen.add(actor)  # bounded: only to count distinct actors
                    others.actors += 1
                actor = OTHERS
            entry = actors.setdefault(actor, _Count())
            entry.count += 1
            if not entry.reason:
                entry.reason = reason[:300]
            if rpc in entry.rpcs or len(entry.rpcs) < MAX_RPCS:
                entry.rpcs[rpc] = entry.rpcs.get(rpc, 0) + 1

    def _take(self, everything: bool) -> list[Row]:
        now = self._clock()
        with self._lock:
            done = [s for s in self._windows if everything or s + self._window_s <= now]
            taken = [(s, self._windows.pop(s)) for s in sorted(done)]
        rows: list[Row] = []
        for start, classes in taken:
            for cls in CLASSES:
                for actor, c in sorted(classes.get(cls, {}).items()):
                    top = max(c.rpcs, key=lambda r: c.rpcs[r]) if c.rpcs else ""
                    details: dict[str, Any] = {
                        "count": c.count,
                        "window_start": datetime.fromtimestamp(start, UTC).isoformat(),
                        "window_s": self._window_s,
                        "rpcs": dict(sorted(c.rpcs.items())),
                        "first_reason": c.reason,
                    }
                    if actor == OTHERS:
                        details["actors"] = c.actors
                    rows.append((actor, f"refused.{cls}", top, details))
        return rows

    def flush(self, everything: bool = False) -> int:
        """Write the closed windows (everything: the open one too); the rows written."""
        with self._flushing:
            rows = self._take(everything)
            if rows:
                try:
                    self._write(rows)
                except Exception as error:
                    # The database is down: keep the counts for the next flush.
                    log.warning("could not write %d refusal rows: %s", len(rows), error)
                    self._restore(rows)
                    return 0
            return len(rows)

    def _restore(self, rows: list[Row]) -> None:
        with self._lock:
            for actor, action, _target, details in rows:
                start = datetime.fromisoformat(details["window_start"]).timestamp()
                cls = action.removeprefix("refused.")
                actors = self._windows.setdefault(start, {}).setdefault(cls, {})
                entry = actors.setdefault(actor, _Count())
                entry.count += int(details["count"])
                entry.reason = entry.reason or str(details["first_reason"])
                for rpc, n in details["rpcs"].items():
                    entry.rpcs[rpc] = entry.rpcs.get(rpc, 0) + int(n)
                entry.actors += int(details.get("actors", 0))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refusal-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(self._window_s, 10.0)):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush(everything=True)
