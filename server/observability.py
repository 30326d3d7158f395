"""Prometheus metrics, JSON logs and database-aware health for the aggregation server.

`ServerMetrics` owns one CollectorRegistry per server (so several servers can
live in one process, as in the tests) and listens to the round coordinator.
`JsonFormatter` writes one JSON object per log line with the round and device
ids passed as `extra`; it never serializes arguments it was not given, so no
token or key reaches a log through it. `HealthMonitor` sets the gRPC health
status to NOT_SERVING while any of its checks fails: the database does not
answer, the round driver makes no progress it owes, or the disk is nearly full.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.rounds import RoundSummary

log = logging.getLogger("xeno.server.observability")

_ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r = self.registry
        self.rounds_started = Counter(
            "xeno_rounds_started", "Rounds started", ["model"], registry=r
        )
        self.rounds_completed = Counter(
            "xeno_rounds_completed", "Rounds that produced a new version", ["model"], registry=r
        )
        self.rounds_failed = Counter(
            "xeno_rounds_failed", "Rounds that failed cleanly", ["model"], registry=r
        )
        self.round_seconds = Histogram(
            "xeno_round_seconds",
            "Wall time of a round",
            ["model"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "xeno_round_phase_seconds",
            "Wall time of each secure-aggregation phase",
            ["model", "phase"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.aggregation_seconds = Histogram(
            "xeno_aggregation_seconds",
            "CPU time of unmasking and decoding the sum",
            ["model"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.participants = Gauge(
            "xeno_round_participants",
            "Updates aggregated in the last round",
            ["model"],
            registry=r,
        )
        self.dropouts = Gauge(
            "xeno_round_dropouts",
            "Selected devices that dropped in the last round",
            ["model"],
            registry=r,
        )
        self.bytes_in = Counter(
            "xeno_bytes_received", "Update bytes received from devices", ["model"], registry=r
        )
        self.bytes_out = Counter(
            "xeno_bytes_sent", "Model bytes sent to devices", ["model"], registry=r
        )
        self.accuracy = Gauge(
            "xeno_model_accuracy",
            "Server-side evaluation accuracy of the newest version",
            ["model"],
            registry=r,
        )
        self.epsilon = Gauge(
            "xeno_privacy_epsilon_spent",
            "Cumulative epsilon of the global model from the privacy ledger (0 without DP)",
            ["model"],
            registry=r,
        )
        self.epsilon.labels(model).set(0.0)
        self.alerts = Gauge(
            "xeno_performance_alerts",
            "Degradation alerts stored for a metric of the model (server/lifecycle/performance.py)",
            ["model", "metric"],
            registry=r,
        )
        self.health_check = Gauge(
            "xeno_health_check_ok",
            "1 while the health check passes, 0 while it fails (database, round_driver, disk)",
            ["model", "check"],
            registry=r,
        )
        self.serving = Gauge(
            "xeno_serving", "1 while gRPC health reports SERVING", ["model"], registry=r
        )
        self._http: Any = None
        self.track(model)

    def track(self, model: str) -> None:
        """Export every series of this model from the start, zeros included."""
        self.epsilon.labels(model)
        for metric in (
            self.rounds_started,
            self.rounds_completed,
            self.rounds_failed,
            self.round_seconds,
            self.aggregation_seconds,
            self.participants,
            self.dropouts,
            self.bytes_in,
            self.bytes_out,
            self.accuracy,
        ):
            metric.labels(model)

    def round_started(self, _round_id: str, model: str = "") -> None:
        self.rounds_started.labels(model or self.model).inc()

    def round_finished(
        self, summary: RoundSummary, secagg: dict[str, Any], model: str = ""
    ) -> None:
        m = model or self.model
        if summary.kind == "evaluation":
            # Not a training round: only its privacy spend moves a gauge.
            if "dp_epsilon" in summary.metrics:
                self.epsilon.labels(m).set(summary.metrics["dp_epsilon"])
            return
        (self.rounds_completed if summary.status == "completed" else self.rounds_failed).labels(
            m
        ).inc()
        self.round_seconds.labels(m).observe(summary.seconds)
        self.participants.labels(m).set(summary.participants)
        self.dropouts.labels(m).set(summary.dropouts)
        self.bytes_in.labels(m).inc(summary.bytes_in)
        self.bytes_out.labels(m).inc(summary.bytes_out)
        if "accuracy" in summary.metrics:
            self.accuracy.labels(m).set(summary.metrics["accuracy"])
        if "dp_epsilon" in summary.metrics:
            self.epsilon.labels(m).set(summary.metrics["dp_epsilon"])
        for phase, seconds in dict(secagg.get("phase_seconds", {})).items():
            self.phase_seconds.labels(m, phase).observe(float(seconds))
        if "unmask_cpu_seconds" in secagg:
            self.aggregation_seconds.labels(m).observe(float(secagg["unmask_cpu_seconds"]))

    def set_alerts(self, counts: dict[str, int], model: str = "") -> None:
        """Alerts stored per metric (by the server's rounds and by any app using the store)."""
        for metric, count in counts.items():
            self.alerts.labels(model or self.model, metric).set(count)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and round/device ids if given."""

    FIELDS = ("round_id", "round", "device_id", "status", "version")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class HealthMonitor:
    """Runs named checks every interval; gRPC health is SERVING only while all pass.

    A check returns "" when fine, else the reason it fails. Each change is logged
    with its reason, and `xeno_health_check_ok{check}` / `xeno_serving` follow the
    checks, so a container health check, a dashboard and the log tell the same story.
    A check that raises counts as failing with the exception as its reason.
    """

    def __init__(
        self,
        checks: dict[str, Callable[[], str]],
        set_status: Callable[[bool], None],
        metrics: ServerMetrics | None = None,
        interval_s: float = 2.0,
    ) -> None:
        self._checks = checks
        self._set_status = set_status
        self._metrics = metrics
        self._interval = interval_s
        self._stop = threading.Event()
        self.problems: dict[str, str] = {}
        self._serving = True
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        if metrics is not None:
            for name in checks:
                metrics.health_check.labels(metrics.model, name).set(1)
            metrics.serving.labels(metrics.model).set(1)

    def start(self) -> None:
        self._thread.start()

    def check_now(self) -> dict[str, str]:
        """Run every check once, update the health status; returns the failing ones."""
        problems: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                reason = check()
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if reason:
                problems[name] = reason
        for name in self._checks:
            old, new = self.problems.get(name), problems.get(name)
            if new and new != old and not old:
                log.error("health check %s failing: %s", name, new)
            elif old and not new:
                log.warning("health check %s passes again", name)
            if self._metrics is not None:
                self._metrics.health_check.labels(self._metrics.model, name).set(0 if new else 1)
        serving = not problems
        if serving != self._serving:
            self._serving = serving
            self._set_status(serving)
            log.log(
                logging.WARNING if serving else logging.ERROR,
                "health: %s",
                "SERVING" if serving else "NOT_SERVING (" + "; ".join(problems.values()) + ")",
            )
        if self._metrics is not None:
            self._metrics.serving.labels(self._metrics.model).set(1 if serving else 0)
        # Published last: whoever sees a problem here also sees the status and gauges it set.
        self.problems = problems
        return problems

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_now()

    def stop(self) -> None:
        self._stop.set()


def disk_space_check(path: str | None, min_free_mb: float) -> Callable[[], str]:
    """A health check failing when the file system holding path has < min_free_mb free."""

    def check() -> str:
        if path is None or min_free_mb <= 0:
            return ""
        free_mb = shutil.disk_usage(path).free / 2**20
        if free_mb < min_free_mb:
            return (
                f"the database's disk ({path}) has {free_mb:.0f} MB free, "
                f"less than --min-free-disk-mb {min_free_mb:g}"
            )
        return ""

    return check
