"""Device-facing Federation servicer: a thin layer over DeviceRegistry and RoundCoordinator."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from common.certs import CertKind
from common.fedeval import EVAL_COUNTS
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc, tensor_pb2
from common.tensors import CHUNK_BYTES, FramedChunk, Manifest, iter_chunks
from common.tls import peer_identity
from server.errors import Change, ErrorKind, FederationError, RoundCompleted
from server.lifecycle.devices import DeviceLifecycle
from server.privacy import UserDpMechanism
from server.registry import DeviceRegistry
from server.rounds import RoundCoordinator, TaskInfo, UploadSession
from server.runner import ModelRunner
from server.secagg import DeviceKeys, ShareKind
from server.services.aio import (
    RECHECK_S,
    Changes,
    Runner,
    capture_handlers,
    on_loop,
    register_servicer,
)
from server.services.common import abort, abort_async, device_id_of

log = logging.getLogger("xeno.server.federation")

FEDERATION = "xeno.fl.v1.Federation"


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
        secagg=_secagg_config(task),
        privacy=_privacy_config(task),
        evaluation=(
            pb.EvaluationTask(counts=list(EVAL_COUNTS), max_examples=task.eval_max_examples)
            if task.eval_max_examples
            else None
        ),
    )


def _secagg_config(task: TaskInfo) -> pb.SecAggConfig:
    sa = task.secagg
    if sa is None:
        return pb.SecAggConfig(enabled=False)
    return pb.SecAggConfig(
        enabled=True,
        threshold=sa.threshold,
        degree=sa.degree,
        clip_norm=sa.fixed_point.clip_norm,
        scale=sa.fixed_point.scale,
        max_weight=sa.fixed_point.max_weight,
        num_selected=sa.num_selected,
        noise_variance=sa.fixed_point.noise_variance,
        indicator_scale=sa.fixed_point.indicator_scale,
        min_contributors=sa.min_contributors,
        dimension=sa.fixed_point.dimension,
    )


def _privacy_config(task: TaskInfo) -> pb.PrivacyConfig:
    config = pb.PrivacyConfig()
    if task.dp_sgd is not None:
        config.dp_sgd.CopyFrom(
            pb.DpSgdConfig(
                enabled=True,
                noise_multiplier=task.dp_sgd.noise_multiplier,
                max_grad_norm=task.dp_sgd.max_grad_norm,
                target_epsilon=task.dp_sgd.target_epsilon,
                delta=task.dp_sgd.delta,
                planned_rounds=task.dp_sgd.planned_rounds,
            )
        )
    policy = task.user_dp
    if policy is not None:
        mechanism = (
            pb.USER_DP_SKELLAM
            if policy.mechanism is UserDpMechanism.DISTRIBUTED
            else pb.USER_DP_CENTRAL_GAUSSIAN
        )
        config.user_dp.CopyFrom(
            pb.UserDpConfig(
                mechanism=mechanism,
                noise_multiplier=policy.noise_multiplier,
                clip_norm=policy.clip_norm,
                min_contributors=policy.min_contributors,
                delta=policy.delta,
                target_quantile=policy.target_quantile,
                clip_count_noise=policy.count_noise if policy.adaptive else 0.0,
            )
        )
    return config


def _keys_to_proto(keys: DeviceKeys) -> pb.RoundKeys:
    return pb.RoundKeys(
        device_id=keys.device_id,
        encryption_public_key=keys.encryption_public_key,
        mask_public_key=keys.mask_public_key,
        signature=keys.signature,
        identity_public_key=keys.identity_public_key,
    )


async def _receive_stream(
    runner: Runner,
    raw_messages: AsyncIterator[bytes],
    header_type: Any,
    begin: Callable[[Any], UploadSession],
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    rpc: str,
    device: str,
    begin_on_loop: bool = False,
) -> int:
    """Header first, then data chunks into a staged session; commit or abort it whole.

    Messages arrive unparsed (see `register_federation`) and are read as FramedChunk,
    so each data byte is copied at most once: from gRPC's buffer into the staging
    buffer (a plain update), or not at all (a masked one: its chunks are added to the
    sum from gRPC's buffers at commit, see MaskedUploadSession). The session takes its
    staging buffer at the first data chunk (waiting, as a coroutine, while none is
    free); the stream ending, idling or breaking gives it back.
    """
    session = None
    try:
        try:
            messages = aiter(raw_messages)
            first = await anext(messages, None)
            if first is None or FramedChunk(first).WhichOneof("part") != "header":
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT, "the first message of an upload must be its header"
                )
            try:
                header = header_type.FromString(FramedChunk(first).header_bytes)
            except DecodeError:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, "malformed header") from None
            session = await runner.run(begin, header, on_loop=begin_on_loop)
            # Before reading any data (see there); the session's calls run on the loop.
            await runner.call(session.await_buffer, on_loop=True)
            async for raw in messages:
                msg = FramedChunk(raw)
                if msg.WhichOneof("part") != "data":
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT, "only data chunks may follow the header"
                    )
                if session.assembler is None:  # the first data chunk: wait for a buffer
                    await runner.call(session.add_chunk, msg.data, on_loop=True)
                else:  # a memcpy: cheaper here than a hop to the pool
                    session.add_chunk(msg.data)
        except ValueError as exc:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        await runner.run(session.commit, on_loop=session.commit_on_loop)
        received = session.received
        session = None
        return received
    except FederationError as err:
        await abort_async(context, err, rpc, device)
    finally:
        if session is not None:
            session.abort("its stream ended early")


def federation_handlers(servicer: FederationServicer) -> dict[str, Any]:
    """The servicer's method handlers, with UploadUpdate and UploadMasked taking raw bytes.

    The generated registration is reused for every other method; the two upload
    streams get no deserializer so `_receive_stream` can read chunks without
    copying. The wire contract is unchanged.
    """
    handlers = capture_handlers(federation_pb2_grpc.add_FederationServicer_to_server, servicer)
    handlers["UploadUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.UploadUpdate, response_serializer=pb.UploadUpdateResponse.SerializeToString
    )
    handlers["UploadMasked"] = grpc.stream_unary_rpc_method_handler(
        servicer.UploadMasked, response_serializer=pb.UploadMaskedResponse.SerializeToString
    )
    return handlers


def register_federation(servicer: FederationServicer, server: grpc.aio.Server) -> None:
    register_servicer(server, FEDERATION, federation_handlers(servicer), servicer.runner)


class FederationServicer(federation_pb2_grpc.FederationServicer):  # type: ignore[misc]
    """Device calls over the domain layer.

    Plain methods run in the runner's pool (server/services/aio.py); the long poll
    and the streams are coroutines.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        coordinator: RoundCoordinator,
        runner: Runner,
        chunk_bytes: int = CHUNK_BYTES,
        lifecycle: DeviceLifecycle | None = None,
        require_device_cert: bool = False,
        models: ModelRunner | None = None,
    ) -> None:
        self.require_device_cert = require_device_cert
        self.registry = registry
        self.coordinator = coordinator  # the default model's
        # Every model of the server; a round's calls go to the model whose round it is.
        self.models = models or ModelRunner.single(coordinator.store, coordinator)
        self.runner = runner
        self.lifecycle = lifecycle  # the default model's
        # The other models' A/B tests and performance (made on first use).
        self._lifecycles: dict[str, DeviceLifecycle] = {}
        self._lifecycles_lock = threading.Lock()
        self.changes: Changes = runner.changes
        self.chunk_bytes = chunk_bytes

    def _lifecycle(self, model: str) -> DeviceLifecycle | None:
        """The A/B tests and performance log of a model (None: this server runs none)."""
        if self.lifecycle is None or model == self.lifecycle.model_name:
            return self.lifecycle
        with self._lifecycles_lock:
            if model not in self._lifecycles:
                self._lifecycles[model] = DeviceLifecycle(
                    self.models.store,
                    model,
                    alert_settings=self.lifecycle.performance.settings,
                )
            return self._lifecycles[model]

    def _lifecycles_of(self, coordinators: list[RoundCoordinator]) -> list[DeviceLifecycle]:
        """The lifecycles of the models a device checks in for (their A/B tests)."""
        names = dict.fromkeys(c.model_name for c in coordinators)
        return [lc for name in names if (lc := self._lifecycle(name)) is not None]

    def _lifecycle_of_test(self, ab_test: str) -> DeviceLifecycle:
        """The lifecycle of the model an A/B test tests.

        The default model's when no test is named (its performance), or when the test is
        not of a model trained here (that lifecycle then refuses it with its usual status).
        """
        assert self.lifecycle is not None
        if not ab_test:
            return self.lifecycle
        try:
            model = str(self.lifecycle.ab_tests.get(ab_test)["variant_a"]["model"])
        except FederationError:
            return self.lifecycle
        try:
            self.models.get(model)
        except FederationError:
            return self.lifecycle
        return self._lifecycle(model) or self.lifecycle

    def _lifecycle_of_report(self, model_name: str, ab_test: str) -> DeviceLifecycle:
        """The lifecycle a performance report goes to: the named model's (NOT_FOUND if unknown).

        Without a name (devices older than the field), the model of the test, or the default.
        """
        if not model_name:
            return self._lifecycle_of_test(ab_test)
        self.models.get(model_name)  # NOT_FOUND naming the models there are
        lifecycle = self._lifecycle(model_name)
        assert lifecycle is not None
        return lifecycle

    def _of(self, round_id: str) -> RoundCoordinator:
        """The coordinator of the model whose round this is."""
        return self.models.for_round(round_id)

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        cert_name = None
        if self.require_device_cert:
            # mTLS: the handshake verified the certificate; it must be a device's.
            peer = peer_identity(context)
            if peer is None or peer.kind is not CertKind.DEVICE:
                abort(
                    context,
                    FederationError(
                        ErrorKind.PERMISSION_DENIED,
                        "register with a device certificate (xeno-fl admin certs issue DIR "
                        "--device NAME; the client's --tls-cert/--tls-key)",
                    ),
                    "Register",
                    "",
                )
            cert_name = peer.name
        try:
            device_id, token, index = self.registry.register(
                request.enrollment_key,
                dict(request.labels),
                request.identity_public_key,
                cert_name=cert_name,
            )
        except FederationError as err:
            abort(context, err, "Register", "")
        log.info("registered device %s", device_id)
        return pb.RegisterResponse(device_id=device_id, token=token, enrollment_index=index)

    async def CheckIn(
        self,
        request: pb.CheckInRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> pb.CheckInResponse:
        """Long poll as a coroutine: asks the coordinator again on each round change."""
        device = device_id_of(context)
        try:
            coordinators = self.models.eligible(list(request.tasks), list(request.models))
        except FederationError as err:
            await abort_async(context, err, "CheckIn", device)
        loop = asyncio.get_running_loop()
        wait = max(0.0, min(request.max_wait_ms / 1000.0, self.coordinator.config.max_wait_s))
        give_up = loop.time() + wait
        # The device is available while this call waits; a cancelled call (the device
        # stopped, or was killed and its connection closed) takes it off the list at once.
        for coordinator in coordinators:
            await self.runner.run(coordinator.poll_started, device)
        cancelled = True
        outcome = None
        try:
            while True:
                mark = self.changes.marks()[Change.ROUND]
                outcome = await self.runner.run(self.models.check_in_now, device, coordinators)
                remaining = give_up - loop.time()
                if outcome is not None or remaining <= 0 or self.coordinator.stopping:
                    break
                recheck = min(remaining, RECHECK_S[Change.ROUND])
                await self.changes.wait(Change.ROUND, mark, recheck)
            cancelled = False
        finally:
            # Not awaited: a cancelled coroutine must not wait for the pool.
            for coordinator in coordinators:
                self.runner.pool.submit(coordinator.poll_ended, device, cancelled)
        if outcome is None:
            reason = self.models.waiting_reason(coordinators)
            response = pb.CheckInResponse(wait=pb.Wait(retry_after_ms=200, reason=reason))
        elif outcome.finished:
            response = pb.CheckInResponse(finished=pb.Finished(reason=outcome.reason))
        elif outcome.task is None:
            response = pb.CheckInResponse(
                wait=pb.Wait(retry_after_ms=outcome.retry_after_ms, reason=outcome.reason)
            )
        else:
            response = pb.CheckInResponse(task=task_to_proto(outcome.task))
        for lifecycle in self._lifecycles_of(coordinators):
            for a in await self.runner.run(lifecycle.assignments, device):
                response.ab_tests.append(
                    pb.AbAssignment(
                        test_name=a.test_name,
                        variant=a.variant,
                        model_name=a.model_name,
                        model_version=a.model_version,
                        metrics=a.metrics,
                    )
                )
        return response

    async def DownloadModel(
        self,
        request: pb.DownloadModelRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[pb.ModelChunk]:
        device = device_id_of(context)
        if request.ab_test:
            async for message in self._download_variant(request, context, device):
                yield message
            return
        try:
            task, data, digest = await self.runner.run(
                self._of(request.round_id).model_for_download,
                device,
                request.round_id,
            )
        except FederationError as err:
            await abort_async(context, err, "DownloadModel", device)
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                model_name=task.model_name,
                version=task.model_version,
                manifest=task.model.manifest.to_proto(),
                total_bytes=len(data),
                sha256=digest,
                model_spec=tensor_pb2.ModelSpec(
                    architecture=task.model.spec.architecture,
                    config_json=task.model.spec.config_json(),
                ),
            )
        )
        sent = 0
        for chunk in iter_chunks(data, self.chunk_bytes):
            yield pb.ModelChunk(data=chunk)
            sent += len(chunk)
        owner = self.models.for_round(request.round_id)
        await self.runner.run(owner.record_download, device, request.round_id, sent)

    async def _download_variant(
        self,
        request: pb.DownloadModelRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        device: str,
    ) -> AsyncIterator[pb.ModelChunk]:
        """The version this device serves in an A/B test, outside any round."""
        if request.round_id:
            await abort_async(
                context,
                FederationError(
                    ErrorKind.INVALID_ARGUMENT, "name either round_id or ab_test, not both"
                ),
                "DownloadModel",
                device,
            )
        if self.lifecycle is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server runs no A/B tests")
        assert self.lifecycle is not None
        try:
            lifecycle = await self.runner.run(self._lifecycle_of_test, request.ab_test)
            model = await self.runner.run(lifecycle.variant_model, device, request.ab_test)
        except FederationError as err:
            await abort_async(context, err, "DownloadModel", device)
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                model_name=model.model_name,
                version=model.version,
                manifest=model.manifest.to_proto(),
                total_bytes=len(model.data),
                sha256=model.sha256,
                model_spec=tensor_pb2.ModelSpec(
                    architecture=model.spec.architecture, config_json=model.spec.config_json()
                ),
            )
        )
        for chunk in iter_chunks(model.data, self.chunk_bytes):
            yield pb.ModelChunk(data=chunk)

    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> pb.UploadUpdateResponse:
        device = device_id_of(context)

        def begin(header: pb.UpdateHeader) -> UploadSession:
            try:
                manifest = Manifest.from_proto(header.manifest)
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, f"bad manifest: {exc}") from None
            return self._of(header.round_id).begin_upload(
                device,
                header.round_id,
                header.base_version,
                manifest,
                header.total_bytes,
                header.num_examples,
            )

        received = await _receive_stream(
            self.runner, request_iterator, pb.UpdateHeader, begin, context, "UploadUpdate", device
        )
        return pb.UploadUpdateResponse(received_bytes=received)

    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        device = device_id_of(context)
        try:
            self._of(request.round_id).report_metrics(
                device, request.round_id, dict(request.metrics)
            )
        except FederationError as err:
            abort(context, err, "ReportMetrics", device)
        return pb.ReportMetricsResponse()

    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        device = device_id_of(context)
        try:
            self._of(request.round_id).report_evaluation(
                device, request.round_id, list(request.counts)
            )
        except FederationError as err:
            abort(context, err, "ReportEvaluation", device)
        return pb.ReportEvaluationResponse()

    def DeclineTask(
        self, request: pb.DeclineTaskRequest, context: grpc.ServicerContext
    ) -> pb.DeclineTaskResponse:
        device = device_id_of(context)
        try:
            self._of(request.round_id).decline(device, request.round_id, request.reason)
        except FederationError as err:
            abort(context, err, "DeclineTask", device)
        return pb.DeclineTaskResponse()

    def ReportPerformance(
        self, request: pb.ReportPerformanceRequest, context: grpc.ServicerContext
    ) -> pb.ReportPerformanceResponse:
        device = device_id_of(context)
        if self.lifecycle is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server records no performance")
        assert self.lifecycle is not None
        try:
            lifecycle = self._lifecycle_of_report(request.model_name, request.ab_test)
            lifecycle.report(device, dict(request.metrics), request.ab_test)
        except FederationError as err:
            abort(context, err, "ReportPerformance", device)
        return pb.ReportPerformanceResponse()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        device = device_id_of(context)
        self.models.leave(device, request.reason[:500] or "left")
        return pb.LeaveResponse()

    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.ForgetResponse:
        device = device_id_of(context)
        try:
            parts, results = self.models.forget(device, lambda: self.registry.forget(device))
        except FederationError as err:
            abort(context, err, "Forget", device)
        log.info("forgot device %s: %d participations, %d A/B results", device, parts, results)
        return pb.ForgetResponse(participations_deleted=parts, ab_results_deleted=results)

    # ------------------------------------------------------------------ secure aggregation
    @on_loop
    def AdvertiseKeys(
        self, request: pb.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> pb.AdvertiseKeysResponse:
        device = device_id_of(context)
        k = request.keys
        try:
            participants, keys, degree, threshold = self.models.for_round(
                request.round_id
            ).advertise_keys(
                device,
                request.round_id,
                DeviceKeys(
                    k.device_id, k.encryption_public_key, k.mask_public_key, k.signature, b""
                ),
            )
        except FederationError as err:
            abort(context, err, "AdvertiseKeys", device)
        return pb.AdvertiseKeysResponse(
            participants=participants,
            neighbours=[_keys_to_proto(x) for x in keys],
            degree=degree,
            threshold=threshold,
        )

    @on_loop
    def ShareKeys(
        self, request: pb.ShareKeysRequest, context: grpc.ServicerContext
    ) -> pb.ShareKeysResponse:
        device = device_id_of(context)
        try:
            shares: dict[str, bytes] = {}
            for share in request.shares:
                if share.sender != device:
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT, "shares must name this device as sender"
                    )
                if share.receiver in shares:
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT, f"two shares for {share.receiver}"
                    )
                shares[share.receiver] = share.ciphertext
            commitments: dict[str, tuple[bytes, bytes]] = {}
            for c in request.commitments:
                if c.holder in commitments:
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT, f"two share commitments for {c.holder}"
                    )
                commitments[c.holder] = (c.mask_key, c.self_mask_seed)
            mine = self._of(request.round_id).share_keys(
                device, request.round_id, shares, commitments
            )
        except FederationError as err:
            abort(context, err, "ShareKeys", device)
        return pb.ShareKeysResponse(
            shares=[
                pb.EncryptedShare(sender=sender, receiver=device, ciphertext=blob)
                for sender, blob in mine
            ]
        )

    async def UploadMasked(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> pb.UploadMaskedResponse:
        device = device_id_of(context)

        def begin(header: pb.MaskedHeader) -> UploadSession:
            return self._of(header.round_id).begin_masked_upload(
                device, header.round_id, header.total_elements, header.total_bytes
            )

        received = await _receive_stream(
            self.runner,
            request_iterator,
            pb.MaskedHeader,
            begin,
            context,
            "UploadMasked",
            device,
            begin_on_loop=True,  # begin_masked_upload takes its lock with `hold`
        )
        return pb.UploadMaskedResponse(received_bytes=received)

    @on_loop
    def GetUnmaskRequest(
        self, request: pb.GetUnmaskRequestRequest, context: grpc.ServicerContext
    ) -> pb.UnmaskRequest:
        device = device_id_of(context)
        try:
            survivors, dropped, total, everyone = self.models.for_round(
                request.round_id
            ).unmask_request(device, request.round_id)
        except RoundCompleted as done:
            return pb.UnmaskRequest(round_completed=True, completed_version=done.version)
        except FederationError as err:
            abort(context, err, "GetUnmaskRequest", device)
        return pb.UnmaskRequest(
            survivors=survivors, dropped=dropped, total_survivors=total, round_survivors=everyone
        )

    @on_loop
    def ConfirmSurvivors(
        self, request: pb.ConfirmSurvivorsRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmSurvivorsResponse:
        device = device_id_of(context)
        try:
            signatures = self._of(request.round_id).confirm_survivors(
                device, request.round_id, request.signature
            )
        except RoundCompleted as done:
            return pb.ConfirmSurvivorsResponse(round_completed=True, completed_version=done.version)
        except FederationError as err:
            abort(context, err, "ConfirmSurvivors", device)
        return pb.ConfirmSurvivorsResponse(
            signatures=[
                pb.SurvivorSignature(device_id=d, signature=sig, identity_public_key=key)
                for d, sig, key in signatures
            ]
        )

    def Unmask(
        self, request: pb.UnmaskSharesRequest, context: grpc.ServicerContext
    ) -> pb.UnmaskSharesResponse:
        device = device_id_of(context)
        try:
            revealed = []
            for share in request.shares:
                if share.kind == pb.SHARE_KIND_SELF_MASK_SEED:
                    kind = ShareKind.SELF_MASK_SEED
                elif share.kind == pb.SHARE_KIND_MASK_KEY:
                    kind = ShareKind.MASK_KEY
                else:
                    raise FederationError(ErrorKind.INVALID_ARGUMENT, "share kind unspecified")
                revealed.append((share.owner, kind, share.share))
            self._of(request.round_id).unmask(
                device, request.round_id, revealed, list(request.unverifiable)
            )
        except RoundCompleted as done:
            return pb.UnmaskSharesResponse(round_completed=True, completed_version=done.version)
        except FederationError as err:
            abort(context, err, "Unmask", device)
        return pb.UnmaskSharesResponse()
