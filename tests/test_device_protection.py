"""The device decides its own protection, against a server that asks for less.

A malicious server is played by a real gRPC server that hands the real device
loop (`DeviceClient.run`) a crafted task and records every call: the device must
decline with its reason, and never download, upload or advertise keys. Then,
against the real server, a device's own user-level ledger follows the noise it
verified and stops it at its budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.ledger import PrivacyLedger
from client.protection import Protection, TaskDeclined, check_task
from client.runtime import ClientConfig, DeviceClient, load_partition
from client.storage import LocalStore
from common.atrest import Sealer
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc
from common.privacy import skellam_epsilon
from common.quantize import FixedPoint
from server.privacy import UserDpMechanism, UserDpPolicy


class MaliciousServer(federation_pb2_grpc.FederationServicer):  # type: ignore[misc]
    """Hands out one crafted task, then says the federation is over; records every call."""

    def __init__(self, task: pb.Task) -> None:
        self.task = task
        self.calls: list[str] = []
        self.declined: list[str] = []
        self._served = False
        self._lock = threading.Lock()

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        return pb.RegisterResponse(device_id="dev-victim", token="t" * 32)

    def CheckIn(self, request: pb.CheckInRequest, context: Any) -> pb.CheckInResponse:
        with self._lock:
            if self._served:
                return pb.CheckInResponse(finished=pb.Finished(reason="done"))
            self._served = True
        return pb.CheckInResponse(task=self.task)

    def DeclineTask(self, request: pb.DeclineTaskRequest, context: Any) -> pb.DeclineTaskResponse:
        self.declined.append(request.reason)
        return pb.DeclineTaskResponse()

    def _refuse(self, name: str, context: Any) -> None:
        self.calls.append(name)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the test server serves nothing")

    def DownloadModel(self, request: Any, context: Any) -> Iterator[pb.ModelChunk]:
        self._refuse("DownloadModel", context)
        yield pb.ModelChunk()

    def UploadUpdate(self, request_iterator: Any, context: Any) -> pb.UploadUpdateResponse:
        self._refuse("UploadUpdate", context)
        return pb.UploadUpdateResponse()

    def ReportMetrics(self, request: Any, context: Any) -> pb.ReportMetricsResponse:
        self._refuse("ReportMetrics", context)
        return pb.ReportMetricsResponse()

    def AdvertiseKeys(self, request: Any, context: Any) -> pb.AdvertiseKeysResponse:
        self._refuse("AdvertiseKeys", context)
        return pb.AdvertiseKeysResponse()

    def UploadMasked(self, request_iterator: Any, context: Any) -> pb.UploadMaskedResponse:
        self._refuse("UploadMasked", context)
        return pb.UploadMaskedResponse()


def _dp_task(z: float, n_min: int, cohort: int, d: int = 5258, clip: float = 1.0) -> pb.Task:
    """A distributed-DP task whose noise is exactly what its own z and n_min promise."""
    fp = FixedPoint.for_round(
        clip, cohort, 1, noise_multiplier=z, min_contributors=n_min, dimension=d
    )
    return pb.Task(
        round_id="r" * 32,
        round_number=1,
        model_name="digits-mlp",
        model_version=1,
        deadline_unix_ms=int((time.time() + 60) * 1000),
        secagg=pb.SecAggConfig(
            enabled=True,
            threshold=cohort // 2 + 1,
            degree=cohort - 1,
            clip_norm=clip,
            scale=fp.scale,
            max_weight=1,
            num_selected=cohort,
            noise_variance=fp.noise_variance,
            min_contributors=n_min,
            dimension=d,
        ),
        privacy=pb.PrivacyConfig(
            user_dp=pb.UserDpConfig(
                mechanism=pb.USER_DP_SKELLAM,
                noise_multiplier=z,
                clip_norm=clip,
                min_contributors=n_min,
                delta=1e-5,
            )
        ),
    )


def _with_cohort(task: pb.Task, cohort: int) -> pb.Task:
    out = pb.Task()
    out.CopyFrom(task)
    out.secagg.num_selected = cohort
    out.secagg.degree = cohort - 1
    out.secagg.threshold = cohort
    return out


def _without_dp(task: pb.Task) -> pb.Task:
    out = pb.Task()
    out.CopyFrom(task)
    out.privacy.ClearField("user_dp")
    out.secagg.noise_variance = 0.0
    out.secagg.min_contributors = 0
    return out


def _plain_task(mechanism: int = pb.USER_DP_NONE) -> pb.Task:
    return pb.Task(
        round_id="p" * 32,
        round_number=1,
        model_name="digits-mlp",
        model_version=1,
        deadline_unix_ms=int((time.time() + 60) * 1000),
        secagg=pb.SecAggConfig(enabled=False),
        privacy=pb.PrivacyConfig(
            user_dp=pb.UserDpConfig(mechanism=mechanism, noise_multiplier=1.0, clip_norm=1.0)
        ),
    )


def _run_device_against(task: pb.Task, tmp_path: Path, **settings: Any) -> MaliciousServer:
    servicer = MaliciousServer(task)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    federation_pb2_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        config = ClientConfig(
            server=f"127.0.0.1:{port}",
            state_dir=str(tmp_path / "device"),
            partition=0,
            num_partitions=10,
            max_wait_ms=500,
            max_backoff=0.5,
            **settings,
        )
        client = DeviceClient(config, load_partition(config))
        try:
            done = threading.Thread(target=client.run, daemon=True)
            done.start()
            done.join(timeout=30)
            assert not done.is_alive(), "the device did not finish"
        finally:
            client.stop.set()
            client.close()
    finally:
        server.stop(0)
    return servicer


@pytest.mark.parametrize(
    ("task", "settings", "reason"),
    [
        # Asks for the update in the clear: the default device requires secure aggregation.
        (_plain_task(), {}, "requires secure aggregation"),
        # Central DP: the server adds the noise after it has seen the update.
        (
            _plain_task(pb.USER_DP_CENTRAL_GAUSSIAN),
            {"allow_plaintext": True, "require_user_dp": True},
            "central DP",
        ),
        # A task that keeps its own (tiny) promise: z = 1e-6, declined by the default device.
        (_dp_task(1e-6, 5, 10), {}, "below this device's minimum 0.5"),
        # ...and by one with its own, higher minimum.
        (_dp_task(0.8, 5, 10), {"min_noise_multiplier": 0.9}, "below this device's minimum 0.9"),
        # Noise sized for 1,000 contributors of a 2-device sum.
        (_with_cohort(_dp_task(1.0, 1000, 1000), 2), {}, "round selected 2 devices"),
        # A single round worth more than the device's budget for this model.
        (
            _dp_task(0.3, 5, 10),
            {"max_user_epsilon": 1.0, "min_noise_multiplier": 0.0},
            "budget of model 'digits-mlp'",
        ),
        # No user-level noise at all, for a device that has a budget.
        (_without_dp(_dp_task(1.0, 5, 10)), {"max_user_epsilon": 5.0}, "no user-level noise"),
        (_without_dp(_dp_task(1.0, 5, 10)), {"require_user_dp": True}, "no user-level noise"),
    ],
    ids=[
        "plaintext",
        "central-dp",
        "tiny-z-default",
        "z-below-own-minimum",
        "n-min-above-cohort",
        "over-budget",
        "no-dp-with-budget",
        "no-dp-required",
    ],
)
def test_a_malicious_task_is_declined_with_its_reason_and_nothing_uploaded(
    task: pb.Task, settings: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    servicer = _run_device_against(task, tmp_path, **settings)
    assert len(servicer.declined) == 1, servicer.declined
    assert reason in servicer.declined[0], servicer.declined[0]
    assert servicer.calls == [], f"the device called {servicer.calls} for a declined task"


def test_the_user_level_ledger_is_per_model_and_stops_at_the_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(LocalStore(str(tmp_path / "store"), Sealer(b"\x22" * 32)))
    task = _dp_task(2.0, 5, 10)
    sensitivity = FixedPoint.for_round(
        1.0, 10, 1, noise_multiplier=2.0, min_contributors=5, dimension=5258
    ).sensitivity
    one, three, four = (skellam_epsilon(2.0, k, 1e-5, sensitivity, 5258) for k in (1, 3, 4))
    protection = Protection(max_user_epsilon=(three + four) / 2)
    for r in range(3):
        spend = check_task(task, protection, ledger)
        assert spend is not None
        assert spend.noise_multiplier == pytest.approx(2.0, rel=1e-6)
        ledger.record(f"round-{r}", "digits-mlp", "user", "skellam-distributed", spend, 1e-5)
    assert ledger.entries[0].epsilon == pytest.approx(one, rel=1e-6)
    assert ledger.entries[-1].epsilon == pytest.approx(three, rel=1e-6)
    with pytest.raises(TaskDeclined, match="budget of model 'digits-mlp' exceeded"):
        check_task(task, protection, ledger)
    # Another model has its own account; a reopened ledger remembers the spends.
    other = pb.Task()
    other.CopyFrom(task)
    other.model_name = "intent"
    assert check_task(other, protection, ledger) is not None
    reopened = PrivacyLedger(LocalStore(str(tmp_path / "store"), Sealer(b"\x22" * 32)))
    assert reopened.epsilon(1e-5, "user", "digits-mlp") == pytest.approx(three, rel=1e-6)
    assert reopened.epsilon(1e-5, "user", "intent") == 0.0


def test_devices_account_the_noise_they_verified_and_stop_at_their_budget(
    server_factory, device_threads
) -> None:
    """Real server, distributed DP: the devices' own ledgers match the server's; then they stop."""
    z = 1.0
    server = server_factory(
        secagg=True,
        dp="distributed",
        dp_noise_multiplier=z,
        dp_clip_norm=1.0,
        min_clients=3,
        clients_per_round=3,
        dp_min_contributors=3,
        selection_window=0.5,
        eval_data="none",
    )
    d = server.coordinator.model.manifest.total_elements
    fp = UserDpPolicy(UserDpMechanism.DISTRIBUTED, z, 1.0, 3).fixed_point(3, d)
    two, three = (skellam_epsilon(z, k, 1e-5, fp.sensitivity, fp.noisy_dimension) for k in (2, 3))
    devices = device_threads(
        server, 3, min_noise_multiplier=0.9, max_user_epsilon=(two + three) / 2
    )
    deadline = time.monotonic() + 120
    while True:
        rounds = server.store.list_rounds(server.config.model)
        failed = [r for r in rounds if r.status == "failed"]
        if failed:
            break
        assert time.monotonic() < deadline, "no round was declined"
        time.sleep(0.2)
    assert [r.status for r in rounds if r.status == "completed"] == ["completed"] * 2
    notes = [p.note for p in server.store.round_participants(failed[0].id)]
    assert len(notes) == 3 and all("budget of model 'digits-mlp' exceeded" in n for n in notes)
    server_epsilon = server.store.privacy_ledger(server.config.model)[-1].epsilon
    for device in devices:
        entries = [e for e in device.client.ledger.entries if e.level == "user"]
        assert len(entries) == 2
        assert entries[-1].epsilon == pytest.approx(two, rel=1e-6)
        assert entries[-1].epsilon == pytest.approx(server_epsilon, rel=1e-6)


def test_the_default_device_runs_secure_rounds_without_dp_and_checks_promised_noise(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(LocalStore(str(tmp_path / "store"), Sealer(b"\x23" * 32)))
    default = Protection()
    assert default.min_noise_multiplier == 0.5 and not default.allow_plaintext
    # Secure aggregation without user-level DP promises no noise: it runs.
    assert check_task(_without_dp(_dp_task(1.0, 5, 10)), default, ledger) is None
    # A promise of noise is held to the default minimum, at its verified value.
    spend = check_task(_dp_task(0.5, 5, 10), default, ledger)
    assert spend is not None and spend.noise_multiplier == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(TaskDeclined, match=r"0\.49 .*below this device's minimum 0\.5"):
        check_task(_dp_task(0.49, 5, 10), default, ledger)
    # A device told to accept any noise does.
    assert check_task(_dp_task(1e-6, 5, 10), Protection(min_noise_multiplier=0.0), ledger)
