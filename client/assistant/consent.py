"""The user's consent records: what they allowed, when, and what they withdrew.

Every grant and withdrawal is appended (never updated), so the history is
the record; the latest entry of a scope is in force, and no entry means no.
`federated_examples` is the only way federated training reads the user's
training examples, and it checks consent *before* touching them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from client.assistant.store import UserStore

__all__ = [
    "ConsentRequiredError",
    "Scope",
    "consent_history",
    "federated_examples",
    "given",
    "record",
]


class Scope(StrEnum):
    FEDERATED_TRAINING = "federated_training"
    """Train the shared intent model on this device's examples (updates leave, text never)."""
    PERSONALIZATION = "personalization"
    """Learn preferences from interactions on this device."""


class ConsentRequiredError(PermissionError):
    """The user has not consented to this use of their data."""


def _scope(scope: object) -> Scope:
    try:
        return Scope(str(scope))
    except ValueError:
        raise ValueError(
            f"unknown consent scope {scope!r}; allowed: {', '.join(s.value for s in Scope)}"
        ) from None


def record(store: UserStore, scope: str, granted: bool) -> None:
    s = _scope(scope)
    if not isinstance(granted, bool):
        raise ValueError(f"granted must be true or false, got {granted!r}")
    with store.transaction() as db:
        db.execute(
            "INSERT INTO consent (scope, granted, ts) VALUES (?, ?, ?)",
            (s.value, int(granted), store.clock()),
        )


def given(store: UserStore, scope: str) -> bool:
    s = _scope(scope)
    rows = store.query(
        "SELECT granted FROM consent WHERE scope = ? ORDER BY id DESC LIMIT 1", (s.value,)
    )
    return bool(rows and rows[0][0])


def consent_history(store: UserStore) -> list[dict[str, Any]]:
    return [
        {"scope": s, "granted": bool(g), "timestamp": ts}
        for s, g, ts in store.query("SELECT scope, granted, ts FROM consent ORDER BY id")
    ]


def federated_examples(store: UserStore) -> list[tuple[str, str]]:
    """(text, intent) examples for federated training; ConsentRequiredError without consent."""
    if not given(store, Scope.FEDERATED_TRAINING):
        raise ConsentRequiredError(
            "the user has not consented to federated training "
            "(xeno-fl user consent USER --grant federated_training)"
        )
    rows = store.query(
        "SELECT input_text, intent FROM training_examples WHERE intent IS NOT NULL ORDER BY id"
    )
    return [(str(t), str(i)) for t, i in rows]
