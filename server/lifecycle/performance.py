"""Performance history of the store's models: metrics, trends and degradation alerts.

Rounds record their accuracy, loss, participants, dropouts and seconds here
automatically (`record_round`, a listener of the round coordinator); apps and
operators add any metric with a context (`record`). Every record is checked for
degradation, and an alert is stored and logged when

- the newest `alert_window` values of the metric trend the wrong way
  (Mann-Kendall, p < alpha; at most one such alert per window), or
- the newest value is worse than the mean of the `baseline_window` values before
  it by more than `k_sigma` of their standard deviations.

Which way is worse comes from the metric's direction (stats.direction_of, or
`directions`): lower loss and latency are improvements.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from server.lifecycle.errors import InvalidInputError, UnknownNameError
from server.lifecycle.stats import Direction, Trend, TrendResult, direction_of, trend
from server.rounds import RoundSummary
from server.store import Store, utcnow
from server.store.models import ModelRow, PerformanceAlertRow, PerformanceMetricRow

__all__ = ["ROUND_METRICS", "Alert", "AlertKind", "AlertSettings", "PerformanceLog"]

log = logging.getLogger("xeno.lifecycle.performance")

_METRIC = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
# What every round records (those present in its summary).
ROUND_METRICS = ("accuracy", "loss", "participants", "dropouts", "round_seconds")
# What an evaluation round records for the version it scored (federated evaluation).
FEDERATED_METRICS = ("federated_accuracy", "federated_personalized_accuracy", "eval_examples")


class AlertKind:
    TREND = "trend"
    DEVIATION = "deviation"


@dataclass(frozen=True)
class AlertSettings:
    alert_window: int = 30
    baseline_window: int = 20
    k_sigma: float = 3.0
    alpha: float = 0.05
    # Fewest baseline values before a deviation alert is possible.
    min_baseline: int = 5


@dataclass(frozen=True)
class Alert:
    model_name: str
    metric: str
    kind: str
    value: float
    baseline: float
    message: str
    details: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "metric": self.metric,
            "kind": self.kind,
            "value": self.value,
            "baseline": self.baseline,
            "message": self.message,
            "details": dict(self.details),
            "created_at": self.created_at.isoformat(),
        }


class PerformanceLog:
    """Metrics, trends and alerts of the store's models (domain layer; no gRPC)."""

    def __init__(
        self,
        store: Store,
        directions: dict[str, Direction] | None = None,
        settings: AlertSettings | None = None,
    ) -> None:
        self.store = store
        self.directions = dict(directions or {})
        self.settings = settings or AlertSettings()

    def direction(self, metric: str) -> Direction:
        return self.directions.get(metric) or direction_of(metric)

    def _model_id(self, s: Session, name: str) -> int:
        model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == name))
        if model_id is None:
            known = ", ".join(s.scalars(select(ModelRow.name).order_by(ModelRow.id))) or "none"
            raise UnknownNameError(f"no model {name!r}; models: {known}")
        return int(model_id)

    # ---------------------------------------------------------------- record
    @staticmethod
    def validate(metric: str, value: Any) -> float:
        """The value as a float; InvalidInputError for a bad name or a non-finite value."""
        return _check_value(metric, value)

    def record(
        self,
        model_name: str,
        metric: str,
        value: float,
        context: dict[str, Any] | None = None,
        version: int | None = None,
        round_number: int | None = None,
        check: bool = True,
    ) -> list[Alert]:
        """Store one observation; returns the alerts it raised (already stored and logged)."""
        value = _check_value(metric, value)
        ctx = _check_context(context)
        with self.store.session() as s, s.begin():
            model_id = self._model_id(s, model_name)
            s.add(
                PerformanceMetricRow(
                    model_id=model_id,
                    metric=metric,
                    value=value,
                    context=ctx,
                    version=version,
                    round_number=round_number,
                    recorded_at=utcnow(),
                )
            )
        return self.check(model_name, metric) if check else []

    def record_many(
        self, model_name: str, metric: str, values: list[float] | np.ndarray, context: Any = None
    ) -> int:
        """Bulk-load observations (imports, benchmarks): one statement, no alert checks."""
        checked = [_check_value(metric, v) for v in np.asarray(values, dtype=np.float64).tolist()]
        ctx = _check_context(context)
        with self.store.session() as s, s.begin():
            model_id = self._model_id(s, model_name)
            now = utcnow()
            s.execute(
                insert(PerformanceMetricRow),
                [
                    {
                        "model_id": model_id,
                        "metric": metric,
                        "value": v,
                        "context": ctx,
                        "recorded_at": now,
                    }
                    for v in checked
                ],
            )
        return len(checked)

    def record_round(self, model_name: str, summary: RoundSummary) -> list[Alert]:
        """What a finished round says about the model: accuracy, loss, counts, seconds.

        An evaluation round records its federated accuracy (and personalized accuracy,
        examples) for the version it scored: one row per metric, `version` that version.
        """
        values: dict[str, float] = {
            "participants": float(summary.participants),
            "dropouts": float(summary.dropouts),
            "round_seconds": float(summary.seconds),
        }
        keys: tuple[str, ...] = ("accuracy", "loss")
        if summary.kind == "evaluation":
            values = {}
            keys = FEDERATED_METRICS
        for key in keys:
            if key in summary.metrics and math.isfinite(summary.metrics[key]):
                values[key] = float(summary.metrics[key])
        source = "round" if summary.kind == "training" else summary.kind
        context = {"source": source, "status": summary.status}
        now = utcnow()
        with self.store.session() as s, s.begin():
            model_id = self._model_id(s, model_name)
            s.add_all(
                PerformanceMetricRow(
                    model_id=model_id,
                    metric=metric,
                    value=value,
                    context=context,
                    version=summary.version,
                    round_number=summary.number,
                    recorded_at=now,
                )
                for metric, value in values.items()
            )
        alerts: list[Alert] = []
        for metric in values:
            alerts += self.check(model_name, metric)
        return alerts

    # ---------------------------------------------------------------- read
    def values(self, model_name: str, metric: str, window: int | None = None) -> np.ndarray:
        """The metric's values, oldest first; the newest `window` only when given."""
        if window is not None and (isinstance(window, bool) or window < 1):
            raise InvalidInputError(f"window must be a whole number >= 1, got {window!r}")
        with self.store.session() as s:
            model_id = self._model_id(s, model_name)
            q = (
                select(PerformanceMetricRow.value)
                .where(
                    PerformanceMetricRow.model_id == model_id,
                    PerformanceMetricRow.metric == metric,
                )
                .order_by(PerformanceMetricRow.recorded_at.desc(), PerformanceMetricRow.id.desc())
            )
            if window is not None:
                q = q.limit(window)
            data = np.fromiter(s.scalars(q), dtype=np.float64)
        return data[::-1].copy()

    def trend(self, model_name: str, metric: str, window: int | None = None) -> TrendResult:
        data = self.values(model_name, metric, window)
        if data.size == 0:
            self._require_metric(model_name, metric)
        return trend(data, self.direction(metric), self.settings.alpha)

    def _require_metric(self, model_name: str, metric: str) -> None:
        with self.store.session() as s:
            model_id = self._model_id(s, model_name)
            known = sorted(
                s.scalars(
                    select(PerformanceMetricRow.metric)
                    .where(PerformanceMetricRow.model_id == model_id)
                    .distinct()
                )
            )
        raise UnknownNameError(
            f"model {model_name!r} has no recorded metric {metric!r}; "
            f"recorded: {', '.join(known) or 'none'}"
        )

    def history(
        self,
        model_name: str,
        metric: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        context: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Observations oldest first, filtered by metric, time and context (all pairs match)."""
        with self.store.session() as s:
            model_id = self._model_id(s, model_name)
            q = select(PerformanceMetricRow).where(PerformanceMetricRow.model_id == model_id)
            if metric is not None:
                q = q.where(PerformanceMetricRow.metric == metric)
            if since is not None:
                q = q.where(PerformanceMetricRow.recorded_at >= since)
            if until is not None:
                q = q.where(PerformanceMetricRow.recorded_at <= until)
            q = q.order_by(PerformanceMetricRow.recorded_at, PerformanceMetricRow.id)
            rows = [
                r
                for r in s.scalars(q)
                if not context or all(r.context.get(k) == v for k, v in context.items())
            ]
        if limit is not None:
            rows = rows[-limit:]
        return [
            {
                "metric": r.metric,
                "value": r.value,
                "context": dict(r.context),
                "version": r.version,
                "round": r.round_number,
                "recorded_at": r.recorded_at.isoformat(),
            }
            for r in rows
        ]

    def statistics(self, model_name: str, metric: str, window: int | None = None) -> dict[str, Any]:
        """Summary of the series plus its trend test."""
        data = self.values(model_name, metric, window)
        if data.size == 0:
            self._require_metric(model_name, metric)
        result = trend(data, self.direction(metric), self.settings.alpha)
        return {
            "count": int(data.size),
            "mean": float(data.mean()),
            "std": float(data.std(ddof=1)) if data.size > 1 else 0.0,
            "min": float(data.min()),
            "max": float(data.max()),
            "latest": float(data[-1]),
            "trend": result.to_dict(),
        }

    # ---------------------------------------------------------------- alerts
    def check(self, model_name: str, metric: str) -> list[Alert]:
        """Look for degradation in the newest values; store and log what is found."""
        cfg = self.settings
        data = self.values(model_name, metric, max(cfg.alert_window, cfg.baseline_window + 1))
        direction = self.direction(metric)
        found: list[tuple[str, float, float, str, dict[str, Any]]] = []
        latest = float(data[-1]) if data.size else math.nan
        base = data[-cfg.baseline_window - 1 : -1]
        if base.size >= cfg.min_baseline:
            mean, std = float(base.mean()), float(base.std(ddof=1))
            worse = (mean - latest) if direction is Direction.HIGHER else (latest - mean)
            if std > 0 and worse > cfg.k_sigma * std:
                found.append(
                    (
                        AlertKind.DEVIATION,
                        latest,
                        mean,
                        f"{metric} of model {model_name} is {latest:.6g}, worse than its "
                        f"baseline {mean:.6g} by {worse / std:.1f} standard deviations "
                        f"(threshold {cfg.k_sigma:g}; {direction.value} is better)",
                        {"std": std, "sigmas": worse / std, "baseline_points": int(base.size)},
                    )
                )
        window = data[-cfg.alert_window :]
        if window.size >= cfg.alert_window:
            result = trend(window, direction, cfg.alpha)
            if result.trend is Trend.DEGRADING and not self._recent_trend_alert(
                model_name, metric, cfg.alert_window
            ):
                found.append(
                    (
                        AlertKind.TREND,
                        latest,
                        float(window.mean()),
                        f"{metric} of model {model_name} is degrading over its last "
                        f"{window.size} values (Mann-Kendall tau {result.tau:.3f}, p "
                        f"{result.p_value:.3g}; Theil-Sen slope {result.slope:.4g} per value)",
                        result.to_dict(),
                    )
                )
        alerts: list[Alert] = []
        if not found:
            return alerts
        now = utcnow()
        with self.store.session() as s, s.begin():
            model_id = self._model_id(s, model_name)
            for kind, value, baseline, message, details in found:
                details = json.loads(json.dumps(details))
                s.add(
                    PerformanceAlertRow(
                        model_id=model_id,
                        metric=metric,
                        kind=kind,
                        value=value,
                        baseline=baseline,
                        message=message,
                        details=details,
                        created_at=now,
                    )
                )
                log.warning(
                    "performance alert: %s",
                    message,
                    extra={"model": model_name, "metric": metric, "alert": kind},
                )
                alerts.append(
                    Alert(model_name, metric, kind, value, baseline, message, details, now)
                )
        return alerts

    def _recent_trend_alert(self, model_name: str, metric: str, window: int) -> bool:
        """Whether a trend alert of this metric was raised within its newest `window` values."""
        with self.store.session() as s:
            model_id = self._model_id(s, model_name)
            oldest = s.scalar(
                select(func.min(PerformanceMetricRow.recorded_at)).where(
                    PerformanceMetricRow.id.in_(
                        select(PerformanceMetricRow.id)
                        .where(
                            PerformanceMetricRow.model_id == model_id,
                            PerformanceMetricRow.metric == metric,
                        )
                        .order_by(PerformanceMetricRow.id.desc())
                        .limit(window)
                    )
                )
            )
            last = s.scalar(
                select(func.max(PerformanceAlertRow.created_at)).where(
                    PerformanceAlertRow.model_id == model_id,
                    PerformanceAlertRow.metric == metric,
                    PerformanceAlertRow.kind == AlertKind.TREND,
                )
            )
        return last is not None and oldest is not None and _aware(last) >= _aware(oldest)

    def alerts(
        self, model_name: str | None = None, metric: str | None = None, limit: int = 100
    ) -> list[Alert]:
        """Stored alerts, newest first."""
        with self.store.session() as s:
            q = select(PerformanceAlertRow, ModelRow.name).join(
                ModelRow, ModelRow.id == PerformanceAlertRow.model_id
            )
            if model_name is not None:
                q = q.where(PerformanceAlertRow.model_id == self._model_id(s, model_name))
            if metric is not None:
                q = q.where(PerformanceAlertRow.metric == metric)
            q = q.order_by(PerformanceAlertRow.id.desc()).limit(limit)
            return [
                Alert(
                    name,
                    r.metric,
                    r.kind,
                    r.value,
                    r.baseline,
                    r.message,
                    dict(r.details),
                    r.created_at,
                )
                for r, name in s.execute(q)
            ]

    def alert_counts(self, model_name: str) -> dict[str, int]:
        """Stored alerts per metric of a model (the Prometheus gauge)."""
        with self.store.session() as s:
            model_id = self._model_id(s, model_name)
            return {
                m: int(n)
                for m, n in s.execute(
                    select(PerformanceAlertRow.metric, func.count())
                    .where(PerformanceAlertRow.model_id == model_id)
                    .group_by(PerformanceAlertRow.metric)
                )
            }


def _aware(dt: datetime) -> datetime:
    from datetime import UTC

    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _check_value(metric: str, value: Any) -> float:
    if not isinstance(metric, str) or not _METRIC.match(metric):
        raise InvalidInputError(
            f"bad metric name {metric!r}: 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"metric {metric!r} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidInputError(f"metric {metric!r} is not finite: {value!r}")
    return out


def _check_context(context: Any) -> dict[str, Any]:
    if context is None:
        return {}
    if not isinstance(context, dict) or not all(isinstance(k, str) for k in context):
        raise InvalidInputError("context must be a dict with string keys")
    try:
        text = json.dumps(context, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"context must be JSON (strings, numbers, lists): {exc}") from None
    if len(text) > 4096:
        raise InvalidInputError("context is at most 4 KiB of JSON")
    return dict(json.loads(text))
