"""Operator-facing Admin servicer: views of models, versions and rounds, and the model lifecycle.

Thin: the lifecycle calls go to server/lifecycle/, whose refusals carry the
gRPC status they map to (a refused call changes nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from common.pb import admin_pb2 as pb
from common.pb import admin_pb2_grpc, tensor_pb2
from server.errors import ErrorKind, FederationError
from server.lifecycle.abtests import AbTests
from server.lifecycle.performance import AlertSettings, PerformanceLog
from server.lifecycle.versions import DEFAULT_KEEP, VersionControl, VersionRecord
from server.modelconf import parse_settings
from server.privacy import privacy_report
from server.revocation import Revocation, Revocations
from server.runner import ModelRunner
from server.services.common import status_code
from server.store import ModelDefinition, ModelRecord, Store, audit_entries, audit_head
from server.store.audit import iso as audit_iso
from server.store.audit import verify as verify_audit

T = TypeVar("T")


def _ms(dt: object) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else 0  # type: ignore[attr-defined]


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: Store,
        privacy_budget: float = 0.0,
        models: ModelRunner | None = None,
        revocations: Revocations | None = None,
        before_audit_read: Callable[[], object] | None = None,
        alert_settings: AlertSettings | None = None,
    ) -> None:
        """Over a store; with `models` (a running server's), models can be created and paused."""
        self.store = store
        self.models = models
        self.privacy_budget = privacy_budget
        # The server's live revocation list (None: reading the database directly).
        self.revocations = revocations
        # Writes what is pending for the audit log (aggregated refusals) before a read.
        self.before_audit_read = before_audit_read
        self.versions = VersionControl(store)
        self.performance = PerformanceLog(store, settings=alert_settings)
        self.ab_tests = AbTests(store)

    @staticmethod
    def _run(context: grpc.ServicerContext, call: Callable[[], T]) -> T:
        try:
            return call()
        except FederationError as err:
            context.abort(status_code(err.kind), err.message)
            raise AssertionError("unreachable: context.abort raises") from err

    def _model_or_abort(self, name: str, context: grpc.ServicerContext) -> None:
        if self.store.get_model(name) is None:
            known = ", ".join(m.name for m in self.store.list_models()) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name!r}; models: {known}")

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        definitions = {d.name: d for d in self.store.model_definitions()}
        return pb.ListModelsResponse(
            models=[self._model_info(m, definitions.get(m.name)) for m in self.store.list_models()]
        )

    def _model_info(self, m: ModelRecord, definition: ModelDefinition | None) -> pb.ModelInfo:
        info = pb.ModelInfo(
            name=m.name,
            current_version=m.current_version,
            spec=tensor_pb2.ModelSpec(
                architecture=m.spec.architecture, config_json=m.spec.config_json()
            ),
            num_parameters=m.num_parameters,
            strategy=m.strategy,
            created_unix_ms=_ms(m.created_at),
        )
        if definition is not None:
            info.task = definition.task
            info.paused = definition.paused
            info.settings_json = json.dumps(definition.settings, sort_keys=True)
            info.source = definition.source
        if self.models is not None:
            try:
                trained = self.models.get(m.name)
            except FederationError:
                return info
            info.training = True
            info.paused = trained.paused
            info.strategy = trained.coordinator.strategy.name
        return info

    def _runner(self) -> ModelRunner:
        if self.models is None:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                "models are created, paused, resumed, deleted and evaluated on a running "
                "server: use --server",
            )
        return self.models

    def _describe(self, name: str) -> pb.ModelInfo:
        record = self.store.get_model(name)
        assert record is not None
        return self._model_info(record, self.store.model_definition(name))

    def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        def create() -> pb.ModelInfo:
            runner = self._runner()
            try:
                table = parse_settings(request.name, request.settings_toml, runner.base)
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
            runner.create(table.name, table.settings, paused=request.paused or table.paused)
            return self._describe(table.name)

        return self._run(context, create)

    def PauseModel(
        self, request: pb.PauseModelRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        return self._run(context, lambda: self._set_paused(request.name, True))

    def ResumeModel(
        self, request: pb.ResumeModelRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        return self._run(context, lambda: self._set_paused(request.name, False))

    def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        def delete() -> pb.ModelInfo:
            self._runner().delete(request.name)
            return self._describe(request.name)

        return self._run(context, delete)

    def EvaluateModel(
        self, request: pb.EvaluateModelRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateModelResponse:
        def evaluate() -> pb.EvaluateModelResponse:
            if not request.name:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, "name the model to evaluate")
            if self.store.get_model(request.name) is None:
                known = ", ".join(m.name for m in self.store.list_models()) or "none"
                raise FederationError(
                    ErrorKind.NOT_FOUND, f"no model {request.name!r}; models: {known}"
                )
            model = self._runner().get(request.name)  # NOT_FOUND once deleted
            version, queued = model.coordinator.schedule_evaluation(request.version)
            return pb.EvaluateModelResponse(name=request.name, version=version, queued=queued)

        return self._run(context, evaluate)

    def _set_paused(self, name: str, paused: bool) -> pb.ModelInfo:
        self._runner().set_paused(name, paused)
        return self._describe(name)

    def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListVersionsResponse:
        self._model_or_abort(request.model_name, context)
        round_ids = {
            v.version: v.round_id or "" for v in self.store.list_versions(request.model_name)
        }
        records = self._run(context, lambda: self.versions.history(request.model_name))
        return pb.ListVersionsResponse(
            versions=[_version_info(r, round_ids.get(r.version, "")) for r in records]
        )

    def GetVersion(
        self, request: pb.GetVersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionInfo:
        ref: int | str | None = request.tag or (request.version or None)
        record = self._run(context, lambda: self.versions.get(request.model_name, ref))
        rows = {v.version: v.round_id or "" for v in self.store.list_versions(request.model_name)}
        return _version_info(record, rows.get(record.version, ""))

    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.ServicerContext
    ) -> pb.RollbackResponse:
        version = self._run(
            context,
            lambda: self.versions.rollback(
                request.model_name,
                int(request.target_version),
                request.operator or "admin",
                request.reason,
            ),
        )
        return pb.RollbackResponse(version=version)

    def CompareVersions(
        self, request: pb.CompareVersionsRequest, context: grpc.ServicerContext
    ) -> pb.CompareVersionsResponse:
        out = self._run(
            context,
            lambda: self.versions.compare(
                request.model_name, int(request.version_a), int(request.version_b)
            ),
        )
        changes = {}
        for key, c in out["metric_changes"].items():
            change = pb.MetricChange(v1=c["v1"], v2=c["v2"], change=c["change"])
            if c["change_percent"] is not None:
                change.change_percent = c["change_percent"]
            changes[key] = change
        return pb.CompareVersionsResponse(
            version_a=out["version_a"],
            version_b=out["version_b"],
            metric_changes=changes,
            only_in_a=out["only_in_a"],
            only_in_b=out["only_in_b"],
            l2_distance=out["weight_distance"]["l2"],
            cosine_similarity=out["weight_distance"]["cosine_similarity"],
        )

    def SetTag(self, request: pb.SetTagRequest, context: grpc.ServicerContext) -> pb.SetTagResponse:
        if request.remove:
            version = self._run(
                context, lambda: self.versions.untag(request.model_name, request.tag)
            )
        else:
            version = self._run(
                context,
                lambda: self.versions.tag(
                    request.model_name,
                    request.version or None,
                    request.tag,
                    request.operator or "admin",
                ),
            )
        return pb.SetTagResponse(version=version)

    def PruneVersions(
        self, request: pb.PruneVersionsRequest, context: grpc.ServicerContext
    ) -> pb.PruneVersionsResponse:
        if request.keep < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"keep must be >= 1, got {request.keep}"
            )
        deleted = self._run(
            context, lambda: self.versions.prune(request.model_name, request.keep or DEFAULT_KEEP)
        )
        return pb.PruneVersionsResponse(deleted=deleted)

    def GetRoundHistory(
        self, request: pb.GetRoundHistoryRequest, context: grpc.ServicerContext
    ) -> pb.GetRoundHistoryResponse:
        self._model_or_abort(request.model_name, context)
        return pb.GetRoundHistoryResponse(
            rounds=[
                pb.RoundInfo(
                    round_id=r.id,
                    number=r.number,
                    status=r.status,
                    base_version=r.base_version,
                    result_version=r.result_version or 0,
                    selected=r.selected,
                    participants=r.participants,
                    dropouts=r.dropouts,
                    bytes_in=r.bytes_in,
                    bytes_out=r.bytes_out,
                    seconds=r.seconds,
                    metrics={k: float(x) for k, x in r.metrics.items()},
                    failure_reason=r.failure_reason,
                    started_unix_ms=_ms(r.started_at),
                )
                for r in self.store.list_rounds(request.model_name, request.limit)
            ]
        )

    def _budget(self, name: str) -> float:
        """The model's own privacy budget (its definition), else the server's."""
        definition = self.store.model_definition(name)
        if definition is not None and "privacy_budget" in definition.settings:
            return float(definition.settings["privacy_budget"])
        return self.privacy_budget

    def GetPrivacyReport(
        self, request: pb.GetPrivacyReportRequest, context: grpc.ServicerContext
    ) -> pb.PrivacyReport:
        self._model_or_abort(request.model_name, context)
        report = privacy_report(self.store, request.model_name, self._budget(request.model_name))
        return pb.PrivacyReport(
            model_name=report.model,
            entries=[
                pb.PrivacyLedgerEntry(
                    round_id=r.round_id,
                    round_number=r.round_number,
                    level=r.level,
                    mechanism=r.mechanism,
                    noise_multiplier=r.noise_multiplier,
                    sample_rate=r.sample_rate,
                    steps=r.steps,
                    clip_norm=r.clip_norm,
                    cohort=r.cohort,
                    epsilon=r.epsilon,
                    delta=r.delta,
                    created_unix_ms=_ms(r.created_at),
                )
                for r in report.records
            ],
            epsilon=report.epsilon,
            delta=report.delta,
            status=report.status,
            budget=report.budget,
            devices=[
                pb.DevicePrivacySummary(
                    device_id=d.device_id,
                    rounds=d.rounds,
                    epsilon=d.epsilon,
                    reported_sample_epsilon=d.reported_sample_epsilon,
                )
                for d in report.devices
            ],
        )

    def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.ServicerContext
    ) -> pb.ListAlertsResponse:
        alerts = self._run(
            context,
            lambda: self.performance.alerts(
                request.model_name or None, request.metric or None, request.limit or 100
            ),
        )
        return pb.ListAlertsResponse(
            alerts=[
                pb.AlertInfo(
                    model_name=a.model_name,
                    metric=a.metric,
                    kind=a.kind,
                    value=a.value,
                    baseline=a.baseline,
                    message=a.message,
                    created_unix_ms=_ms(a.created_at),
                )
                for a in alerts
            ]
        )

    def GetTrend(self, request: pb.GetTrendRequest, context: grpc.ServicerContext) -> pb.TrendInfo:
        if request.window < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "window must be >= 0 (0: all)")
        r = self._run(
            context,
            lambda: self.performance.trend(
                request.model_name, request.metric, request.window or None
            ),
        )
        return pb.TrendInfo(
            trend=r.trend.value,
            direction=r.direction.value,
            n=r.n,
            tau=r.tau,
            p_value=r.p_value,
            slope=r.slope,
            slope_low=r.slope_low,
            slope_high=r.slope_high,
        )

    def CreateAbTest(
        self, request: pb.CreateAbTestRequest, context: grpc.ServicerContext
    ) -> pb.AbTestInfo:
        info = self._run(
            context,
            lambda: self.ab_tests.create(
                request.name,
                request.model_a,
                request.model_b,
                request.traffic_split,
                list(request.metrics),
            ),
        )
        return _ab_info(info)

    def ListAbTests(
        self, request: pb.ListAbTestsRequest, context: grpc.ServicerContext
    ) -> pb.ListAbTestsResponse:
        return pb.ListAbTestsResponse(tests=[_ab_info(t) for t in self.ab_tests.all()])

    def AssignVariant(
        self, request: pb.AssignVariantRequest, context: grpc.ServicerContext
    ) -> pb.AssignVariantResponse:
        variant = self._run(
            context, lambda: self.ab_tests.assign(request.test_name, request.user_id)
        )
        info = self._run(context, lambda: self.ab_tests.get(request.test_name))
        return pb.AssignVariantResponse(variant=variant.value, arm=_ab_arm(info[variant.value]))

    def RecordAbResult(
        self, request: pb.RecordAbResultRequest, context: grpc.ServicerContext
    ) -> pb.RecordAbResultResponse:
        self._run(
            context,
            lambda: self.ab_tests.record(request.test_name, request.variant, dict(request.metrics)),
        )
        return pb.RecordAbResultResponse()

    def AnalyzeAbTest(
        self, request: pb.AnalyzeAbTestRequest, context: grpc.ServicerContext
    ) -> pb.AbAnalysis:
        out = self._run(
            context,
            lambda: self.ab_tests.analyze(request.test_name, request.method or "welch"),
        )
        metrics = {}
        for key, m in out["metrics"].items():
            msg = pb.AbMetricAnalysis(
                winner=m["winner"],
                count_a=m["count_a"],
                count_b=m["count_b"],
                direction=m["direction"],
            )
            for field in (
                "variant_a_mean",
                "variant_b_mean",
                "difference",
                "percent_change",
                "ci_low",
                "ci_high",
                "p_value",
                "sequential_p_value",
                "sequential_ci_low",
                "sequential_ci_high",
            ):
                if m[field] is not None:
                    setattr(msg, field, m[field])
            metrics[key] = msg
        ratio = out["sample_ratio"]
        return pb.AbAnalysis(
            test=_ab_info(out),
            method=out["method"],
            metrics=metrics,
            sample_ratio=pb.SampleRatio(
                count_a=ratio["count_a"],
                count_b=ratio["count_b"],
                expected_share_a=ratio["expected_share_a"],
                p_value=ratio["p_value"],
                mismatch=ratio["mismatch"],
            ),
        )

    def EndAbTest(
        self, request: pb.EndAbTestRequest, context: grpc.ServicerContext
    ) -> pb.AbTestInfo:
        info = self._run(
            context,
            lambda: self.ab_tests.end(
                request.test_name, request.winner or None, request.tag or "production"
            ),
        )
        return _ab_info(info)

    # security ------------------------------------------------------------------
    def RevokeCertificate(
        self, request: pb.RevokeCertificateRequest, context: grpc.ServicerContext
    ) -> pb.RevokedCertificate:
        serial = request.serial.strip().lower().removeprefix("0x").replace(":", "")
        given = [x for x in (serial, request.device_name, request.admin_name) if x]
        if len(given) != 1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give exactly one of a serial, a device name or an admin name",
            )
        if serial and (len(serial) > 40 or any(c not in "0123456789abcdef" for c in serial)):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.serial!r} is not a certificate serial (hex, up to 40 digits)",
            )
        if len(request.reason) > 500:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the reason is over 500 characters")
        kind = "device" if request.device_name else "admin" if request.admin_name else ""
        row = self.store.revoke_certificate(
            serial, kind, request.device_name or request.admin_name, request.reason
        )
        revocation = _revocation(row)
        if self.revocations is not None:
            self.revocations.add(revocation)
        return _revoked_info(revocation)

    def ListRevokedCertificates(
        self, request: pb.ListRevokedCertificatesRequest, context: grpc.ServicerContext
    ) -> pb.ListRevokedCertificatesResponse:
        return pb.ListRevokedCertificatesResponse(
            revoked=[_revoked_info(_revocation(r)) for r in self.store.revoked_certificates()]
        )

    def ListAuditLog(
        self, request: pb.ListAuditLogRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditLogResponse:
        if request.limit < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0 (0: all)")
        if self.before_audit_read is not None:
            self.before_audit_read()
        entries = audit_entries(self.store, int(request.limit))
        head = audit_head(self.store)
        return pb.ListAuditLogResponse(
            entries=[
                pb.AuditEntry(
                    seq=e.seq,
                    time_ms=_ms(e.created_at),
                    time_iso=audit_iso(e.created_at),
                    actor=e.actor,
                    action=e.action,
                    target=e.target,
                    details_json=json.dumps(e.details, sort_keys=True),
                    prev_hash=e.prev_hash,
                    hash=e.hash,
                )
                for e in entries
            ],
            head_seq=head[0] if head else 0,
            head_hash=head[1] if head else "",
        )

    def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: grpc.ServicerContext
    ) -> pb.AuditVerdict:
        if request.head and (
            len(request.head) != 64 or any(c not in "0123456789abcdef" for c in request.head)
        ):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "head must be a saved head hash: 64 lowercase hexadecimal characters",
            )
        if self.before_audit_read is not None:
            self.before_audit_read()
        verdict = verify_audit(audit_entries(self.store), audit_head(self.store), request.head)
        return pb.AuditVerdict(
            ok=verdict.ok,
            rows=verdict.rows,
            head=verdict.head,
            first_bad=verdict.first_bad or 0,
            problem=verdict.problem,
        )


def _revocation(row: Any) -> Revocation:
    return Revocation(row.serial, row.kind, row.name, row.reason, row.revoked_at)


def _revoked_info(r: Revocation) -> pb.RevokedCertificate:
    return pb.RevokedCertificate(
        serial=r.serial, kind=r.kind, name=r.name, reason=r.reason, revoked_at_ms=_ms(r.revoked_at)
    )


def _ab_arm(arm: Any) -> pb.AbArm:
    return pb.AbArm(model_name=arm["model"], version=arm["version"], reference=arm["reference"])


def _ab_info(info: dict[str, Any]) -> pb.AbTestInfo:
    # An analysis replaces the declared metric list by per-metric results, keyed in order.
    return pb.AbTestInfo(
        name=info["test_name"],
        status=info["status"],
        traffic_split=info["traffic_split"],
        metrics=list(info["metrics"]),
        variant_a=_ab_arm(info["variant_a"]),
        variant_b=_ab_arm(info["variant_b"]),
        winner=info["winner"] or "",
    )


def _version_info(r: VersionRecord, round_id: str) -> pb.VersionInfo:
    return pb.VersionInfo(
        version=r.version,
        sha256=r.sha256,
        parent_version=r.parent_version or 0,
        round_id=round_id,
        created_unix_ms=_ms(r.created_at),
        metrics=r.metrics,
        description=r.description,
        created_by=r.created_by,
        tags=r.tags,
        round_number=r.round_number or 0,
        rollback_of=r.rollback_of or 0,
    )
