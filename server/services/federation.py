"""Device-facing Federation servicer: a thin layer over DeviceRegistry and RoundCoordinator."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc, tensor_pb2
from common.tensors import CHUNK_BYTES, Manifest, iter_chunks
from server.errors import ErrorKind, FederationError
from server.registry import DeviceRegistry
from server.rounds import RoundCoordinator, TaskInfo
from server.services.common import abort, device_id_of

log = logging.getLogger("xeno.server.federation")


def task_to_proto(task: TaskInfo) -> pb.Task:
    fit = task.fit
    return pb.Task(
        round_id=task.round_id,
        round_number=task.round_number,
        model_name=task.model_name,
        model_version=task.model_version,
        model_spec=tensor_pb2.ModelSpec(
            architecture=task.model.spec.architecture, config_json=task.model.spec.config_json()
        ),
        config=pb.FitConfig(
            local_epochs=fit.local_epochs,
            batch_size=fit.batch_size,
            learning_rate=fit.learning_rate,
            proximal_mu=fit.proximal_mu,
            momentum=fit.momentum,
            extra=fit.extra,
        ),
        deadline_unix_ms=task.deadline_unix_ms,
        model_bytes=task.model_bytes,
    )


class FederationServicer(federation_pb2_grpc.FederationServicer):  # type: ignore[misc]
    def __init__(
        self,
        registry: DeviceRegistry,
        coordinator: RoundCoordinator,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.registry = registry
        self.coordinator = coordinator
        self.chunk_bytes = chunk_bytes

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        try:
            device_id, token = self.registry.register(request.enrollment_key, dict(request.labels))
        except FederationError as err:
            abort(context, err, "Register", "")
        log.info("registered device %s", device_id)
        return pb.RegisterResponse(device_id=device_id, token=token)

    def CheckIn(
        self, request: pb.CheckInRequest, context: grpc.ServicerContext
    ) -> pb.CheckInResponse:
        device = device_id_of(context)
        outcome = self.coordinator.check_in(device, request.max_wait_ms / 1000.0)
        if outcome.finished:
            return pb.CheckInResponse(finished=pb.Finished(reason=outcome.reason))
        if outcome.task is None:
            return pb.CheckInResponse(
                wait=pb.Wait(retry_after_ms=outcome.retry_after_ms, reason=outcome.reason)
            )
        return pb.CheckInResponse(task=task_to_proto(outcome.task))

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        device = device_id_of(context)
        try:
            task, data, digest = self.coordinator.model_for_download(device, request.round_id)
        except FederationError as err:
            abort(context, err, "DownloadModel", device)
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                model_name=task.model_name,
                version=task.model_version,
                manifest=task.model.manifest.to_proto(),
                total_bytes=len(data),
                sha256=digest,
            )
        )
        sent = 0
        for chunk in iter_chunks(data, self.chunk_bytes):
            yield pb.ModelChunk(data=chunk)
            sent += len(chunk)
        self.coordinator.record_download(device, request.round_id, sent)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        device = device_id_of(context)
        session = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT, "the first message of an upload must be its header"
                )
            header = first.header
            try:
                manifest = Manifest.from_proto(header.manifest)
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, f"bad manifest: {exc}") from None
            session = self.coordinator.begin_upload(
                device,
                header.round_id,
                header.base_version,
                manifest,
                header.total_bytes,
                header.num_examples,
            )
            for msg in request_iterator:
                if msg.WhichOneof("part") != "data":
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT, "only data chunks may follow the header"
                    )
                session.add_chunk(msg.data)
            session.commit()
            received = session.assembler.received
            session = None
            return pb.UploadUpdateResponse(received_bytes=received)
        except FederationError as err:
            abort(context, err, "UploadUpdate", device)
        finally:
            if session is not None:
                session.abort()

    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        device = device_id_of(context)
        try:
            self.coordinator.report_metrics(device, request.round_id, dict(request.metrics))
        except FederationError as err:
            abort(context, err, "ReportMetrics", device)
        return pb.ReportMetricsResponse()

    def DeclineTask(
        self, request: pb.DeclineTaskRequest, context: grpc.ServicerContext
    ) -> pb.DeclineTaskResponse:
        device = device_id_of(context)
        try:
            self.coordinator.decline(device, request.round_id, request.reason)
        except FederationError as err:
            abort(context, err, "DeclineTask", device)
        return pb.DeclineTaskResponse()
