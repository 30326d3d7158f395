"""The DP limits a user saves for their device: validated, kept in their store, read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.assistant.dp_limits import DpLimits, load_dp_limits, save_dp_limits, saved_dp_limits
from client.assistant.store import UserStore


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_noise_multiplier": -0.1}, "minimum noise multiplier must be between 0 and 1000"),
        ({"min_noise_multiplier": float("inf")}, "minimum noise multiplier must be between"),
        ({"max_user_epsilon": float("nan")}, "epsilon budget must be between 0 and 1000, got nan"),
        ({"max_user_epsilon": 1e6}, "epsilon budget must be between 0 and 1000, got 1000000.0"),
        ({"max_user_epsilon": "3"}, "epsilon budget must be a number, got '3'"),
        ({"min_noise_multiplier": True}, "minimum noise multiplier must be a number, got True"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"min_noise_multiplier": 1.0, "max_user_epsilon": 4.0}
    fields.update(kwargs)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        DpLimits(**fields)  # type: ignore[arg-type]


def test_limits_round_trip_through_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENO_DEVICE_KEY", "cd" * 32)
    assert saved_dp_limits("ann", tmp_path) is None  # no store: none made
    assert not (tmp_path / "users" / "ann").exists()
    with UserStore("ann", home=tmp_path) as store:
        assert load_dp_limits(store) is None
        save_dp_limits(store, DpLimits(2.0, 6.5))
        save_dp_limits(store, DpLimits(1.25, 0.0))  # the latest save wins
    assert saved_dp_limits("ann", tmp_path) == DpLimits(1.25, 0.0)
    with UserStore("ann", home=tmp_path) as store, store.transaction() as db:
        db.execute(
            'UPDATE meta SET value = \'{"min_noise_multiplier": -1, "max_user_epsilon": 1}\''
            " WHERE key = 'dp_limits'"
        )
    with pytest.raises(ValueError, match="the saved DP limits of user 'ann' are unreadable"):
        saved_dp_limits("ann", tmp_path)
