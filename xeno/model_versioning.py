"""The seed's model lifecycle API (../shared/seed/ai-finetuning.md), over the server's own store.

`ModelVersionControl`, `PerformanceTracker` and `ABTestingManager` are thin
facades over `server/lifecycle/`, the domain layer the server's admin API uses
too: a version made here is the head the running federation trains from next
round, and the federation's rounds appear in the same history. Constructors
need no arguments: the database is `XENO_DB`, else `sqlite:///$XENO_HOME/xeno.db`;
`db=` takes any SQLAlchemy URL.

Refusals raise `LookupError` (unknown model, version, tag or test),
`ValueError` (malformed input) or `RuntimeError` (the state does not allow it),
each also a `server.errors.FederationError` with the admin API's status; a
refused call changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import torch

from common.tensors import unflatten_to_state_dict
from server.lifecycle.abtests import AbTests
from server.lifecycle.errors import InvalidInputError
from server.lifecycle.performance import AlertSettings, PerformanceLog
from server.lifecycle.stats import Direction
from server.lifecycle.versions import DEFAULT_KEEP, VersionControl
from server.store import Store
from xeno._store import open_store, weights_of

__all__ = ["ABTestingManager", "ModelVersionControl", "PerformanceTracker"]


class ModelVersionControl:
    """Versions of the store's models: create, read, roll back, compare, tag, prune."""

    def __init__(self, db: str | None = None, *, store: Store | None = None) -> None:
        self._store = store or open_store(db)
        self._owns_store = store is None
        self._versions = VersionControl(self._store)

    def close(self) -> None:
        if self._owns_store:
            self._store.close()

    def create_version(
        self,
        model_name: str,
        model_data: Any,
        created_by: str = "api",
        description: str = "",
        metrics: dict[str, float] | None = None,
        architecture: str | None = None,
    ) -> int:
        """Store model_data (a torch module, a state dict, or flat float32) as the new head.

        Returns the version number. A new model name creates the model; its first
        version needs a module or a state dict (flat weights carry no tensor layout).
        """
        vector, manifest, spec = weights_of(model_data, architecture)
        return self._versions.create_version(
            model_name, vector, manifest, created_by, description, metrics, spec
        )

    def get_version(self, model_name: str, version: int | str | None = None) -> dict[str, Any]:
        """The record of a version (the head without version; a tag name works too)."""
        return self._versions.get(model_name, version).to_dict()

    def load_state_dict(
        self, model_name: str, version: int | str | None = None
    ) -> dict[str, torch.Tensor]:
        """The weights of a version as a state dict."""
        vector, manifest = self._versions.weights(model_name, version)
        return unflatten_to_state_dict(vector, manifest)

    def list_versions(self, model_name: str) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self._versions.history(model_name)]

    def rollback(
        self, model_name: str, target_version: int, created_by: str = "api", reason: str = ""
    ) -> int:
        """A new head with the target's weights (history is kept); returns its number.

        A running server trains from it from its next round; a round in flight fails
        as superseded instead of landing on the old head.
        """
        return self._versions.rollback(model_name, target_version, created_by, reason)

    def compare_versions(
        self, model_name: str, version_a: int | str, version_b: int | str
    ) -> dict[str, Any]:
        """`metric_changes` per metric (v1, v2, change, change_percent) and `weight_distance`."""
        return self._versions.compare(model_name, version_a, version_b)

    def tag_version(
        self, model_name: str, tag: str, version: int | str | None = None, created_by: str = "api"
    ) -> int:
        """Point an alias (`production`, `staging`, any name) at a version (default: the head)."""
        return self._versions.tag(model_name, version, tag, created_by)

    def untag(self, model_name: str, tag: str) -> int:
        return self._versions.untag(model_name, tag)

    def get_tags(self, model_name: str) -> dict[str, int]:
        return self._versions.tags(model_name)

    def resolve(self, reference: str) -> tuple[str, int]:
        """(model, version) of `name`, `name:VERSION` or `name@TAG`."""
        return self._versions.resolve(reference)

    def prune(self, model_name: str, keep: int = DEFAULT_KEEP) -> list[int]:
        """Delete all but the newest `keep` versions, never a tagged or A/B-tested one."""
        return self._versions.prune(model_name, keep)


class PerformanceTracker:
    """Metrics of the store's models over time: history, trends, degradation alerts.

    The server records every round's accuracy, loss, participants, dropouts and
    round seconds into the same history.
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        store: Store | None = None,
        alert_settings: AlertSettings | None = None,
    ) -> None:
        self._store = store or open_store(db)
        self._owns_store = store is None
        self._log = PerformanceLog(self._store, settings=alert_settings)

    def close(self) -> None:
        if self._owns_store:
            self._store.close()

    def set_direction(self, metric_name: str, better: str) -> None:
        """Declare which way a metric improves: "higher" or "lower" (default: by its name)."""
        try:
            self._log.directions[metric_name] = Direction(better)
        except ValueError:
            raise InvalidInputError(
                f"a metric gets better 'higher' or 'lower', not {better!r}"
            ) from None

    def record_metric(
        self,
        model_name: str,
        metric_name: str,
        value: float,
        context: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> list[dict[str, Any]]:
        """Record one value; returns the degradation alerts it raised (stored and logged)."""
        alerts = self._log.record(model_name, metric_name, value, context, version=version)
        return [a.to_dict() for a in alerts]

    def get_trend(self, model_name: str, metric_name: str, window: int | None = None) -> str:
        """The metric's trend: improving, degrading or stable.

        Mann-Kendall at p < 0.05, judged by the metric's good direction (lower loss and
        latency are improvements); `window` limits it to the newest N values.
        """
        return self._log.trend(model_name, metric_name, window).trend.value

    def get_trend_statistics(
        self, model_name: str, metric_name: str, window: int | None = None
    ) -> dict[str, Any]:
        """The trend test behind get_trend: n, tau, p_value, Theil-Sen slope and its 95% CI."""
        return self._log.trend(model_name, metric_name, window).to_dict()

    def get_statistics(
        self, model_name: str, metric_name: str, window: int | None = None
    ) -> dict[str, Any]:
        """count, mean, std, min, max, latest and the trend test of a metric."""
        return self._log.statistics(model_name, metric_name, window)

    def get_history(
        self,
        model_name: str,
        metric_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        context: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded values oldest first; context filters on equal key/value pairs."""
        return self._log.history(model_name, metric_name, since, until, context, limit)

    def get_alerts(
        self, model_name: str | None = None, metric_name: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Stored degradation alerts, newest first."""
        return [a.to_dict() for a in self._log.alerts(model_name, metric_name, limit)]


class ABTestingManager:
    """A/B tests between two model versions (or aliases) across users and devices.

    `traffic_split` is the share of users in variant_a. Assignment is sticky without a
    stored table: a SHA-256 hash of (test, user). `analyze_test` declares a winner only
    when Welch's t-test gives p < 0.05 (else "inconclusive"); the seed's example, with one
    result per arm, is inconclusive.
    """

    def __init__(self, db: str | None = None, *, store: Store | None = None) -> None:
        self._store = store or open_store(db)
        self._owns_store = store is None
        self._tests = AbTests(self._store)

    def close(self) -> None:
        if self._owns_store:
            self._store.close()

    def create_test(
        self,
        test_name: str,
        model_a: str,
        model_b: str,
        traffic_split: float = 0.5,
        metrics: list[str] | None = None,
    ) -> dict[str, Any]:
        """A running test; models are `name` (its head now), `name:VERSION` or `name@TAG`."""
        return self._tests.create(test_name, model_a, model_b, traffic_split, metrics or [])

    def assign_variant(self, test_name: str, user_id: str) -> str:
        """The user's variant, variant_a or variant_b: the same every time."""
        return self._tests.assign(test_name, user_id).value

    def record_result(self, test_name: str, variant: str, metrics: dict[str, float]) -> None:
        """One observation of some of the test's declared metrics in one arm."""
        self._tests.record(test_name, variant, metrics)

    def analyze_test(self, test_name: str, method: str = "welch") -> dict[str, Any]:
        """Per metric: means, difference (b - a), percent_change, winner, counts, 95% CI, p.

        method "welch" (look once, at a sample size fixed in advance) or "sequential"
        (mSPRT: stays valid when analyzed after every result); both p-values are reported.
        """
        return self._tests.analyze(test_name, method)

    def end_test(
        self, test_name: str, winner: str | None = None, tag: str = "production"
    ) -> dict[str, Any]:
        """Stop assignment and results; tag the winner's version (winner "none": no tag)."""
        return self._tests.end(test_name, winner, tag)

    def get_test(self, test_name: str) -> dict[str, Any]:
        return self._tests.get(test_name)

    def list_tests(self) -> list[dict[str, Any]]:
        return self._tests.all()
