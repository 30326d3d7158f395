"""What devices see of the model lifecycle: their A/B variants at check-in, their reports.

A device's variant in a test is `abtests.assign(test, device id, split)`: sticky,
computed, never stored. Only running tests whose two arms are versions of the
server's model reach its devices. The running tests are read at most once per
`ttl_s` (check-ins are frequent; a test created or ended shows within that time).
A device downloads its own variant's version (never the other arm's) to serve it;
the few versions under test are kept in memory, as their blobs never change.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from common.modelspec import ModelSpec
from common.tensors import Manifest, to_wire
from server.lifecycle.abtests import AbTests, assign
from server.lifecycle.errors import ConflictError, InvalidInputError, UnknownNameError
from server.lifecycle.performance import AlertSettings, PerformanceLog
from server.lifecycle.versions import VersionControl
from server.store import Store

__all__ = ["Assignment", "DeviceLifecycle", "VariantModel"]

MAX_METRICS = 16
# Versions under test whose wire bytes stay in memory (two arms of a few tests).
CACHED_VERSIONS = 4


@dataclass(frozen=True)
class Assignment:
    test_name: str
    variant: str
    model_name: str
    model_version: int
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class VariantModel:
    """The weights a device serves in an A/B test, as they go on the wire."""

    model_name: str
    version: int
    spec: ModelSpec
    manifest: Manifest
    data: bytes
    sha256: bytes


class DeviceLifecycle:
    def __init__(
        self,
        store: Store,
        model_name: str,
        ttl_s: float = 1.0,
        alert_settings: AlertSettings | None = None,
    ) -> None:
        self.model_name = model_name
        self.ab_tests = AbTests(store)
        self.performance = PerformanceLog(store, settings=alert_settings)
        self.versions = VersionControl(store)
        self._blobs: OrderedDict[int, VariantModel] = OrderedDict()
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._tests: list[dict[str, Any]] = []
        self._read_at = -float("inf")

    def _running(self, fresh: bool = False) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            if fresh or now - self._read_at > self.ttl_s:
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

    def _running_test(self, ab_test: str) -> dict[str, Any]:
        """The running test of this server's model; NOT_FOUND / FAILED_PRECONDITION otherwise."""
        test = next((t for t in self._running() if t["test_name"] == ab_test), None)
        if test is None:  # created since the last read? Read again before refusing.
            test = next((t for t in self._running(True) if t["test_name"] == ab_test), None)
        if test is None:
            info = self.ab_tests.get(ab_test)  # NOT_FOUND for an unknown test
            if info["status"] != "running":
                raise ConflictError(f"A/B test {ab_test!r} has ended")
            raise UnknownNameError(f"A/B test {ab_test!r} does not test model {self.model_name!r}")
        return test

    def variant_model(self, device_id: str, ab_test: str) -> VariantModel:
        """The version this device serves in a running test (its own variant's, only)."""
        if not ab_test:
            raise InvalidInputError("name the A/B test whose variant to download")
        test = self._running_test(ab_test)
        variant = assign(ab_test, device_id, test["traffic_split"]).value
        version = int(test[variant]["version"])
        with self._lock:
            cached = self._blobs.get(version)
            if cached is not None:
                self._blobs.move_to_end(version)
                return cached
        # The store checks the blob's SHA-256 on read; the wire digest is of these bytes.
        weights, manifest = self.versions.weights(self.model_name, version)
        data = to_wire(weights)
        model = VariantModel(
            self.model_name,
            version,
            self.versions.spec(self.model_name),
            manifest,
            data,
            hashlib.sha256(data).digest(),
        )
        with self._lock:
            self._blobs[version] = model
            while len(self._blobs) > CACHED_VERSIONS:
                self._blobs.popitem(last=False)
        return model

    def report(self, device_id: str, metrics: dict[str, float], ab_test: str = "") -> None:
        """Record a device's observations; with ab_test, also as that test's result."""
        if not metrics:
            raise InvalidInputError("no metrics in the report")
        if len(metrics) > MAX_METRICS:
            raise InvalidInputError(f"at most {MAX_METRICS} metrics per report")
        variant = ""
        version: int | None = None
        if ab_test:
            test = self._running_test(ab_test)
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
