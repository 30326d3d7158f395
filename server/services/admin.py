"""Operator-facing Admin servicer: read-only views of models, versions and rounds."""

from __future__ import annotations

import grpc

from common.pb import admin_pb2 as pb
from common.pb import admin_pb2_grpc, tensor_pb2
from server.privacy import privacy_report
from server.store import Store


def _ms(dt: object) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else 0  # type: ignore[attr-defined]


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, store: Store, privacy_budget: float = 0.0) -> None:
        self.store = store
        self.privacy_budget = privacy_budget

    def _model_or_abort(self, name: str, context: grpc.ServicerContext) -> None:
        if self.store.get_model(name) is None:
            known = ", ".join(m.name for m in self.store.list_models()) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name!r}; models: {known}")

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    current_version=m.current_version,
                    spec=tensor_pb2.ModelSpec(
                        architecture=m.spec.architecture, config_json=m.spec.config_json()
                    ),
                    num_parameters=m.num_parameters,
                    strategy=m.strategy,
                    created_unix_ms=_ms(m.created_at),
                )
                for m in self.store.list_models()
            ]
        )

    def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListVersionsResponse:
        self._model_or_abort(request.model_name, context)
        return pb.ListVersionsResponse(
            versions=[
                pb.VersionInfo(
                    version=v.version,
                    sha256=v.blob_sha256,
                    parent_version=v.parent_version or 0,
                    round_id=v.round_id or "",
                    created_unix_ms=_ms(v.created_at),
                    metrics={k: float(x) for k, x in v.metrics.items()},
                    description=v.description,
                )
                for v in self.store.list_versions(request.model_name)
            ]
        )

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

    def GetPrivacyReport(
        self, request: pb.GetPrivacyReportRequest, context: grpc.ServicerContext
    ) -> pb.PrivacyReport:
        self._model_or_abort(request.model_name, context)
        report = privacy_report(self.store, request.model_name, self.privacy_budget)
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
