"""What devices see of the model lifecycle: their A/B variants at check-in, their reports.

A device's variant in a test is `abtests.assign(test, device id, split)`: sticky,
computed, never stored. Only running tests whose two arms are versions of the
server's model reach its devices. The running tests are read at most once per
`ttl_s` (check-ins are frequent; a test created or ended shows within that time).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from server.lifecycle.abtests import AbTests, assign
from server.lifecycle.errors import ConflictError, InvalidInputError, UnknownNameError
from server.lifecycle.performance import PerformanceLog
from server.store import Store

__all__ = ["Assignment", "DeviceLifecycle"]

MAX_METRICS = 16


@dataclass(frozen=True)
class Assignment:
    test_name: str
    variant: str
    model_name: str
    model_version: int
    metrics: tuple[str, ...]


class DeviceLifecycle:
    def __init__(self, store: Store, model_name: str, ttl_s: float = 1.0) -> None:
        self.model_name = model_name
        self.ab_tests = AbTests(store)
        self.performance = PerformanceLog(store)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._tests: list[dict[str, Any]] = []
        self._read_at = -float("inf")

    def _running(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at > self.ttl_s:
                self._tests = self.ab_tests.running_for_model(self.model_name)
                self._read_at = now
            return self._tests

    def assignments(self, device_id: str) -> list[Assignment]:
        out = []
        for t in self._running():
            variant = assign(t["test_name"], device_id, t["traffic_split"]).value
            arm = t[variant]
            out.append(
                Assignment(
                    t["test_name"], variant, arm["model"], arm["version"], tuple(t["metrics"])
                )
            )
        return out

    def report(self, device_id: str, metrics: dict[str, float], ab_test: str = "") -> None:
        """Record a device's observations; with ab_test, also as that test's result."""
        if not metrics:
            raise InvalidInputError("no metrics in the report")
        if len(metrics) > MAX_METRICS:
            raise InvalidInputError(f"at most {MAX_METRICS} metrics per report")
        variant = ""
        version: int | None = None
        if ab_test:
            test = next((t for t in self._running() if t["test_name"] == ab_test), None)
            if test is None:
                info = self.ab_tests.get(ab_test)  # NOT_FOUND for an unknown test
                if info["status"] != "running":
                    raise ConflictError(f"A/B test {ab_test!r} has ended")
                raise UnknownNameError(
                    f"A/B test {ab_test!r} does not test model {self.model_name!r}"
                )
            variant = assign(ab_test, device_id, test["traffic_split"]).value
            version = int(test[variant]["version"])
            undeclared = sorted(set(metrics) - set(test["metrics"]))
            if undeclared:
                raise InvalidInputError(
                    f"A/B test {ab_test!r} does not measure {', '.join(undeclared)}; "
                    f"its metrics: {', '.join(test['metrics'])}"
                )
        # Validate every value before anything is written.
        for name, value in metrics.items():
            self.performance.validate(name, value)
        if ab_test:
            self.ab_tests.record(ab_test, variant, metrics, device_id=device_id)
        context: dict[str, Any] = {"source": "device"}
        if ab_test:
            context.update(ab_test=ab_test, variant=variant)
        for name, value in metrics.items():
            self.performance.record(
                self.model_name, name, value, context, version=version, check=True
            )
