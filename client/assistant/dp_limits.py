"""The DP limits a user chose for their device, kept in their store for `xeno-fl client --user`.

The Privacy tab saves them (minimum noise multiplier, user-level epsilon
budget per model) as JSON in the store's `meta` table; `xeno-fl client
--user USER` enforces them wherever its own flags (or their environment
variables) do not say otherwise. A store without saved limits leaves the
client's defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from client.assistant.keys import UserPaths, validate_user_id, xeno_home
from client.assistant.store import UserStore

KEY = "dp_limits"
MAX_NOISE_MULTIPLIER = 1000.0
MAX_EPSILON = 1000.0


@dataclass(frozen=True)
class DpLimits:
    min_noise_multiplier: float  # 0: no minimum
    max_user_epsilon: float  # per model; 0: no budget

    def __post_init__(self) -> None:
        for name, value, most in (
            ("minimum noise multiplier", self.min_noise_multiplier, MAX_NOISE_MULTIPLIER),
            ("epsilon budget", self.max_user_epsilon, MAX_EPSILON),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or not 0 <= value <= most:
                raise ValueError(f"{name} must be between 0 and {most:g}, got {value!r}")


def save_dp_limits(store: UserStore, limits: DpLimits) -> None:
    with store.transaction() as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (KEY, json.dumps(asdict(limits))))


def load_dp_limits(store: UserStore) -> DpLimits | None:
    rows = store.query("SELECT value FROM meta WHERE key = ?", (KEY,))
    if not rows:
        return None
    try:
        data = json.loads(str(rows[0][0]))
        return DpLimits(float(data["min_noise_multiplier"]), float(data["max_user_epsilon"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"the saved DP limits of user {store.user_id!r} are unreadable: {exc}"
        ) from None


def saved_dp_limits(user_id: str, home: Path | None = None) -> DpLimits | None:
    """The user's saved limits; None when none are saved or no store exists (none is created)."""
    paths = UserPaths(home if home is not None else xeno_home(), validate_user_id(user_id))
    if not paths.database.exists():
        return None
    with UserStore(user_id, home=paths.home) as store:
        return load_dp_limits(store)
