"""A/B tests of model versions across the fleet: sticky assignment, results, significance.

A test pins two model versions (given as `name`, `name:VERSION` or `name@TAG`,
resolved when the test is created). `traffic_split` is the share of users in
variant_a. Assignment is a pure function of (test, user): the first 8 bytes of
SHA-256(test name, NUL, user id) as a fraction of 2^64, below the split -> variant_a,
so it is sticky without a stored table, the same on every server and device, and
uniform (within 1 point of the split over 100,000 users).

`analyze` compares the arms per declared metric with Welch's t-test (95%
confidence interval of the difference, two-sided p) and checks the arm counts
against the split (sample-ratio mismatch, chi-square). A winner is declared only
when p < 0.05, judged by the metric's direction; otherwise "inconclusive".
Two ways to judge, and each analysis reports both (`method` picks the one that
decides the winner):
- "welch" (default): a fixed-horizon test. Decide the sample size first and look
  once; analyzing repeatedly and stopping at the first p < 0.05 ("peeking")
  inflates false winners (to ~20-30% over tens of looks).
- "sequential": the mixture SPRT (`stats.msprt`, Johari et al. 2017), valid when
  analyzed after every result: whenever one stops, the chance of a false winner
  stays at most 0.05. The price is power: it needs more results than Welch to
  declare the same true difference.
`end` stops the test (no more assignments or results) and tags the winner's
version (default `production`).
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import case, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.lifecycle.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    UnknownNameError,
)
from server.lifecycle.stats import (
    Direction,
    direction_of,
    msprt,
    sample_ratio_mismatch,
    welch,
)
from server.lifecycle.versions import VersionControl, parse_reference
from server.store import Store, utcnow
from server.store.models import AbResultRow, AbTestRow, ModelRow

__all__ = ["AbTests", "TestStatus", "Variant", "assign", "bucket"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_METRIC = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
ALPHA = 0.05
SRM_ALPHA = 0.001
METHODS = ("welch", "sequential")


class Variant(enum.Enum):
    A = "variant_a"
    B = "variant_b"


class TestStatus(enum.Enum):
    RUNNING = "running"
    ENDED = "ended"


def bucket(test_name: str, user_id: str) -> float:
    """Where a user falls in [0, 1) for a test: SHA-256 of (test, NUL, user)."""
    digest = hashlib.sha256(f"{test_name}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(test_name: str, user_id: str, traffic_split: float) -> Variant:
    return Variant.A if bucket(test_name, user_id) < traffic_split else Variant.B


@dataclass(frozen=True)
class _Cached:
    split: float
    running: bool
    checked: float


class AbTests:
    """A/B tests over the store (domain layer; no gRPC)."""

    # Seconds an assignment trusts a cached "running"; end() in this process clears it.
    STATUS_TTL_S = 1.0

    def __init__(self, store: Store, directions: dict[str, Direction] | None = None) -> None:
        self.store = store
        self.versions = VersionControl(store)
        self.directions = dict(directions or {})
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def _direction(self, metric: str) -> Direction:
        return self.directions.get(metric) or direction_of(metric)

    def _test(self, s: Session, name: str, lock: bool = False) -> AbTestRow:
        q = select(AbTestRow).where(AbTestRow.name == name)
        row = s.scalar(q.with_for_update() if lock else q)
        if row is None:
            known = ", ".join(s.scalars(select(AbTestRow.name).order_by(AbTestRow.id))) or "none"
            raise UnknownNameError(f"no A/B test {name!r}; tests: {known}")
        return row

    # ---------------------------------------------------------------- create
    def create(
        self,
        name: str,
        model_a: str,
        model_b: str,
        traffic_split: float,
        metrics: list[str],
    ) -> dict[str, Any]:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidInputError(f"bad test name {name!r}: 1-128 letters, digits, '_', '.', '-'")
        if (
            isinstance(traffic_split, bool)
            or not isinstance(traffic_split, (int, float))
            or not math.isfinite(traffic_split)
            or not 0 < traffic_split < 1
        ):
            raise InvalidInputError(
                f"traffic_split is the share of users in variant_a, strictly between 0 and 1; "
                f"got {traffic_split!r}"
            )
        if isinstance(metrics, str) or not metrics:
            raise InvalidInputError("metrics: a non-empty list of metric names")
        metrics = list(metrics)
        for m in metrics:
            if not isinstance(m, str) or not _METRIC.match(m):
                raise InvalidInputError(f"bad metric name {m!r}")
        if len(set(metrics)) != len(metrics):
            raise InvalidInputError("metrics are listed twice")
        ref_a, ref_b = parse_reference(model_a), parse_reference(model_b)
        name_a, version_a = self.versions.resolve(ref_a)
        name_b, version_b = self.versions.resolve(ref_b)
        with self.store.session() as s:
            try:
                with s.begin():
                    ids = dict(
                        s.execute(
                            select(ModelRow.name, ModelRow.id).where(
                                ModelRow.name.in_([name_a, name_b])
                            )
                        ).all()
                    )
                    if s.scalar(select(AbTestRow.id).where(AbTestRow.name == name)) is not None:
                        raise AlreadyExistsError(f"an A/B test named {name!r} exists")
                    s.add(
                        AbTestRow(
                            name=name,
                            model_a=str(ref_a),
                            model_b=str(ref_b),
                            model_a_id=ids[name_a],
                            version_a=version_a,
                            model_b_id=ids[name_b],
                            version_b=version_b,
                            traffic_split=float(traffic_split),
                            metrics=metrics,
                            status=TestStatus.RUNNING.value,
                            winner="",
                            created_at=utcnow(),
                        )
                    )
            except IntegrityError:
                raise AlreadyExistsError(f"an A/B test named {name!r} exists") from None
        return self.get(name)

    # ---------------------------------------------------------------- read
    def get(self, name: str) -> dict[str, Any]:
        with self.store.session() as s:
            row = self._test(s, name)
            return self._info(s, row)

    def all(self) -> list[dict[str, Any]]:
        with self.store.session() as s:
            return [self._info(s, r) for r in s.scalars(select(AbTestRow).order_by(AbTestRow.id))]

    def _info(self, s: Session, row: AbTestRow) -> dict[str, Any]:
        names = dict(
            s.execute(
                select(ModelRow.id, ModelRow.name).where(
                    ModelRow.id.in_([row.model_a_id, row.model_b_id])
                )
            ).all()
        )
        return {
            "test_name": row.name,
            "status": row.status,
            "traffic_split": row.traffic_split,
            "metrics": list(row.metrics),
            "variant_a": {
                "model": names[row.model_a_id],
                "version": row.version_a,
                "reference": row.model_a,
            },
            "variant_b": {
                "model": names[row.model_b_id],
                "version": row.version_b,
                "reference": row.model_b,
            },
            "winner": row.winner or None,
            "created_at": row.created_at.isoformat(),
            "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        }

    # ---------------------------------------------------------------- assign
    def assign(self, name: str, user_id: str) -> Variant:
        """The user's variant; sticky (a hash of test and user). Refused once the test ended."""
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInputError("user_id must be a non-empty string")
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is None or (cached.running and now - cached.checked > self.STATUS_TTL_S):
            with self.store.session() as s:
                row = self._test(s, name)
                cached = _Cached(row.traffic_split, row.status == TestStatus.RUNNING.value, now)
            with self._lock:
                self._cache[name] = cached
        if not cached.running:
            raise ConflictError(f"A/B test {name!r} has ended: no more assignments")
        return assign(name, user_id, cached.split)

    # ---------------------------------------------------------------- results
    def _check_result(
        self, row: AbTestRow, variant: str | Variant, metrics: dict[str, Any]
    ) -> tuple[Variant, dict[str, float]]:
        try:
            arm = variant if isinstance(variant, Variant) else Variant(variant)
        except ValueError:
            raise InvalidInputError(
                f"variant must be 'variant_a' or 'variant_b', not {variant!r}"
            ) from None
        if row.status != TestStatus.RUNNING.value:
            raise ConflictError(
                f"A/B test {row.name!r} has ended (winner {row.winner or 'none'}); "
                "results are no longer recorded"
            )
        if not isinstance(metrics, dict) or not metrics:
            raise InvalidInputError("metrics: a non-empty dict of metric name -> value")
        declared = list(row.metrics)
        unknown = sorted(k for k in metrics if k not in declared)
        if unknown:
            raise InvalidInputError(
                f"A/B test {row.name!r} does not measure {', '.join(map(repr, unknown))}; "
                f"its metrics: {', '.join(declared)}"
            )
        out: dict[str, float] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InvalidInputError(f"metric {key!r} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise InvalidInputError(f"metric {key!r} is not finite: {value!r}")
            out[key] = float(value)
        return arm, out

    def record(
        self, name: str, variant: str | Variant, metrics: dict[str, Any], device_id: str = ""
    ) -> None:
        """One observation of some declared metrics in one arm."""
        with self.store.session() as s, s.begin():
            row = self._test(s, name)
            arm, values = self._check_result(row, variant, metrics)
            now = utcnow()
            ref = self.store.device_ref(device_id)
            s.add_all(
                AbResultRow(
                    test_id=row.id,
                    variant=arm.value,
                    metric=k,
                    value=v,
                    device_ref=ref,
                    recorded_at=now,
                )
                for k, v in values.items()
            )

    def record_many(
        self, name: str, variant: str | Variant, metric: str, values: np.ndarray | list[float]
    ) -> int:
        """Bulk results of one metric in one arm (imports, benchmarks): one statement."""
        data = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(data)):
            raise InvalidInputError(f"metric {metric!r}: every value must be finite")
        with self.store.session() as s, s.begin():
            row = self._test(s, name)
            arm, _ = self._check_result(row, variant, {metric: 0.0})
            now = utcnow()
            s.execute(
                insert(AbResultRow),
                [
                    {
                        "test_id": row.id,
                        "variant": arm.value,
                        "metric": metric,
                        "value": v,
                        "device_ref": "",
                        "recorded_at": now,
                    }
                    for v in data.tolist()
                ],
            )
        return int(data.size)

    # ---------------------------------------------------------------- analyze
    def analyze(self, name: str, method: str = "welch") -> dict[str, Any]:
        """Per metric the arms, both tests' p-values and intervals; `method` picks the winner."""
        if method not in METHODS:
            raise InvalidInputError(
                f"unknown analysis method {method!r}; choose one of: {', '.join(METHODS)}"
            )
        with self.store.session() as s:
            row = self._test(s, name)
            info = self._info(s, row)
            per_metric: dict[str, Any] = {}
            counts = {Variant.A: 0, Variant.B: 0}
            for metric in row.metrics:
                arms = self._arm_stats(s, row.id, metric)
                per_metric[metric] = self._compare(metric, arms, method)
                for arm in Variant:
                    counts[arm] = max(counts[arm], arms[arm][0])
        srm_p = sample_ratio_mismatch(counts[Variant.A], counts[Variant.B], row.traffic_split)
        return {
            **info,
            "method": method,
            "metrics": per_metric,
            "sample_ratio": {
                "count_a": counts[Variant.A],
                "count_b": counts[Variant.B],
                "expected_share_a": row.traffic_split,
                "observed_share_a": (
                    counts[Variant.A] / (counts[Variant.A] + counts[Variant.B])
                    if counts[Variant.A] + counts[Variant.B]
                    else None
                ),
                "p_value": srm_p,
                "mismatch": srm_p < SRM_ALPHA,
            },
        }

    @staticmethod
    def _arm_stats(
        s: Session, test_id: int, metric: str
    ) -> dict[Variant, tuple[int, float, float]]:
        """(count, mean, sample variance) per arm: one pass for the means, one for the spread."""
        where = (AbResultRow.test_id == test_id, AbResultRow.metric == metric)
        first = dict(
            (v, (int(n), float(m) if m is not None else math.nan))
            for v, n, m in s.execute(
                select(AbResultRow.variant, func.count(), func.avg(AbResultRow.value))
                .where(*where)
                .group_by(AbResultRow.variant)
            )
        )
        mean_a = first.get(Variant.A.value, (0, 0.0))[1]
        mean_b = first.get(Variant.B.value, (0, 0.0))[1]
        centred = AbResultRow.value - case(
            (AbResultRow.variant == Variant.A.value, mean_a), else_=mean_b
        )
        spread = dict(
            s.execute(
                select(AbResultRow.variant, func.sum(centred * centred))
                .where(*where)
                .group_by(AbResultRow.variant)
            ).all()
        )
        out: dict[Variant, tuple[int, float, float]] = {}
        for arm in Variant:
            n, mean = first.get(arm.value, (0, math.nan))
            ss = float(spread.get(arm.value) or 0.0)
            out[arm] = (n, mean, ss / (n - 1) if n > 1 else math.nan)
        return out

    def _compare(
        self, metric: str, arms: dict[Variant, tuple[int, float, float]], method: str = "welch"
    ) -> dict[str, Any]:
        (n_a, mean_a, var_a), (n_b, mean_b, var_b) = arms[Variant.A], arms[Variant.B]
        have = n_a > 0 and n_b > 0
        diff = mean_b - mean_a if have else math.nan
        result = welch(n_a, mean_a, var_a, n_b, mean_b, var_b) if n_a > 1 and n_b > 1 else None
        seq = msprt(n_a, mean_a, var_a, n_b, mean_b, var_b, ALPHA) if result else None
        p = result.p_value if result else math.nan
        seq_p = seq.p_value if seq else math.nan
        decisive = p if method == "welch" else seq_p
        winner = "inconclusive"
        if result is not None and math.isfinite(decisive) and decisive < ALPHA and diff != 0:
            b_better = diff > 0 if self._direction(metric) is Direction.HIGHER else diff < 0
            winner = Variant.B.value if b_better else Variant.A.value
        return {
            "variant_a_mean": _num(mean_a),
            "variant_b_mean": _num(mean_b),
            "difference": _num(round(diff, 10)) if have else None,
            "percent_change": (
                round(diff / abs(mean_a) * 100, 2) if have and mean_a != 0 else None
            ),
            "winner": winner,
            "count_a": n_a,
            "count_b": n_b,
            "ci_low": _num(result.ci_low) if result else None,
            "ci_high": _num(result.ci_high) if result else None,
            "p_value": _num(p),
            "sequential_p_value": _num(seq_p),
            "sequential_ci_low": _num(seq.ci_low) if seq else None,
            "sequential_ci_high": _num(seq.ci_high) if seq else None,
            "significant": winner != "inconclusive",
            "direction": self._direction(metric).value,
        }

    # ---------------------------------------------------------------- end
    def end(self, name: str, winner: str | None = None, tag: str = "production") -> dict[str, Any]:
        """Stop the test; tag the winner's version (winner "none": end without promoting).

        Without a winner, the first metric's significant winner is taken; refused when
        it is inconclusive.
        """
        if winner is None:
            first = self.analyze(name)
            metric = next(iter(first["metrics"]))
            winner = first["metrics"][metric]["winner"]
            if winner == "inconclusive":
                raise ConflictError(
                    f"A/B test {name!r} has no significant winner on {metric!r}; "
                    "name the winner (variant_a, variant_b or none)"
                )
        if winner not in (Variant.A.value, Variant.B.value, "none"):
            raise InvalidInputError(
                f"winner must be 'variant_a', 'variant_b' or 'none', not {winner!r}"
            )
        with self.store.session() as s, s.begin():
            row = self._test(s, name, lock=True)
            if row.status != TestStatus.RUNNING.value:
                raise ConflictError(f"A/B test {name!r} has already ended (winner {row.winner})")
            row.status = TestStatus.ENDED.value
            row.winner = winner
            row.ended_at = utcnow()
            model_id, version = (
                (row.model_a_id, row.version_a)
                if winner == Variant.A.value
                else (row.model_b_id, row.version_b)
            )
        with self._lock:
            self._cache.pop(name, None)
        if winner != "none":
            model_name = self._model_name(model_id)
            self.versions.tag(model_name, version, tag, f"ab-test:{name}")
        return self.get(name)

    def _model_name(self, model_id: int) -> str:
        with self.store.session() as s:
            return str(s.scalar(select(ModelRow.name).where(ModelRow.id == model_id)))

    def running_for_model(self, model_name: str) -> list[dict[str, Any]]:
        """Running tests whose two arms are versions of this model (its devices take part)."""
        with self.store.session() as s:
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == model_name))
            rows = s.scalars(
                select(AbTestRow).where(
                    AbTestRow.status == TestStatus.RUNNING.value,
                    AbTestRow.model_a_id == model_id,
                    AbTestRow.model_b_id == model_id,
                )
            ).all()
            return [self._info(s, r) for r in rows]


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
