"""The device's privacy ledger: what its own data has spent, kept in its sealed local store.

Every round the device trains in adds an entry before its update leaves the
device: the mechanism, noise multiplier, sample rate and steps (taken from
the Opacus accountant of that round's DP-SGD), and the cumulative epsilon
over all its rounds, recomputed from the whole history with the RDP
accountant (`common.privacy.epsilon_of`). Spending is recorded when the
training happens, not when the upload succeeds: an update that was computed
may have left the device even if the acknowledgement was lost.

The ledger is one sealed JSON file replaced atomically (write, fsync, rename,
fsync of the directory), so a crash at any moment leaves the old ledger or
the new one, never a torn one. A ledger that cannot be opened (wrong key,
corruption) stops the device: carrying on with an empty ledger would
silently reset the budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from client.storage import LocalStore
from common.atrest import DataKeyError
from common.privacy import Mechanism, Spend, epsilon_of


class LedgerUnreadableError(RuntimeError):
    """The ledger file exists but cannot be opened or parsed."""


@dataclass(frozen=True)
class LedgerEntry:
    round_id: str
    model: str
    level: str  # "sample" (DP-SGD on this device) or "user" (noise on the global sum)
    mechanism: str  # "dp-sgd", "skellam-distributed", "gaussian-central"
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative epsilon of this level and model after the entry, at `delta`
    delta: float
    unix_time: float = 0.0
    # Skellam (user level): the L2 sensitivity and noisy dimension the noise was verified for.
    l2_sensitivity: float = 0.0
    dimension: int = 0

    def spend(self) -> Spend:
        if self.mechanism.startswith("skellam"):
            return Spend(
                Mechanism.SKELLAM,
                self.noise_multiplier,
                self.sample_rate,
                self.steps,
                self.l2_sensitivity,
                self.dimension,
            )
        return Spend(Mechanism.GAUSSIAN, self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    FILE = "privacy_ledger.json"

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self._path = store.dir / self.FILE
        self.entries = self._load()

    def _load(self) -> list[LedgerEntry]:
        try:
            raw = self._store._read_json(self._path)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, DataKeyError) as exc:
            raise LedgerUnreadableError(
                f"privacy ledger {self._path} is unreadable ({exc}); the device will not train "
                "without knowing what it has spent. Restore it or the device key"
            ) from exc
        try:
            return [LedgerEntry(**e) for e in raw["entries"]]
        except (KeyError, TypeError) as exc:
            raise LedgerUnreadableError(f"privacy ledger {self._path} is malformed") from exc

    def spends(self, level: str = "sample", model: str | None = None) -> list[Spend]:
        """Spends of one level; the user level is accounted per model (model given)."""
        return [
            e.spend()
            for e in self.entries
            if e.level == level and (model is None or e.model == model)
        ]

    def epsilon(self, delta: float, level: str = "sample", model: str | None = None) -> float:
        return epsilon_of(self.spends(level, model), delta)

    def epsilon_after(
        self, spend: Spend, delta: float, level: str = "sample", model: str | None = None
    ) -> float:
        return epsilon_of([*self.spends(level, model), spend], delta)

    def record(
        self, round_id: str, model: str, level: str, mechanism: str, spend: Spend, delta: float
    ) -> LedgerEntry:
        """Append one round's spend and persist the ledger before returning.

        User-level entries are accounted per model, sample-level ones over all models
        (the same data trains them all).
        """
        per_model = model if level == "user" else None
        entry = LedgerEntry(
            round_id=round_id,
            model=model,
            level=level,
            mechanism=mechanism,
            noise_multiplier=spend.noise_multiplier,
            sample_rate=spend.sample_rate,
            steps=spend.steps,
            epsilon=self.epsilon_after(spend, delta, level, per_model),
            delta=delta,
            unix_time=time.time(),
            l2_sensitivity=spend.l2_sensitivity,
            dimension=spend.dimension,
        )
        entries = [*self.entries, entry]
        self._store._write_json(self._path, {"entries": [asdict(e) for e in entries]})
        self.entries = entries
        return entry
