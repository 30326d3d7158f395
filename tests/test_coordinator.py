"""The round state machine, driven directly with a fake clock (no network)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from common.models import ModelSpec
from common.tensors import Manifest, TensorInfo, to_wire
from server.errors import ErrorKind, FederationError
from server.rounds import RoundConfig, RoundCoordinator
from server.store import Store
from server.strategies import FedAvg

MANIFEST = Manifest((TensorInfo("w", (2, 3)), TensorInfo("b", (2,))))
D = MANIFEST.total_elements


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(db_url: str) -> Store:
    s = Store(db_url)
    s.create_schema()
    s.create_model("m", ModelSpec("mlp", {}), MANIFEST, "fedavg", np.zeros(D, dtype=np.float32))
    for name in ["a", "b", "c", "zz"] + [f"d{i}" for i in range(6)]:
        s.add_device(name, "0" * 64, {})
    return s


def make(store: Store, clock: Clock, **cfg) -> RoundCoordinator:
    defaults = dict(
        min_clients=2,
        clients_per_round=3,
        round_deadline_s=10,
        selection_window_s=1,
        availability_ttl_s=15,
    )
    defaults.update(cfg)
    return RoundCoordinator(
        store,
        "m",
        FedAvg(),
        RoundConfig(**defaults),
        evaluator=lambda v: {"accuracy": float(v.sum())},
        clock=clock,
        rng=random.Random(0),
    )


def start_round(coord: RoundCoordinator, clock: Clock, devices: list[str]):
    for d in devices:
        coord.check_in(d, 0)
    coord.step()
    clock.now += 5
    coord.step()
    return {d: coord.task_for(d) for d in devices}


def upload(coord, device, task, vector, num_examples=1):
    session = coord.begin_upload(
        device, task.round_id, task.model_version, MANIFEST, 4 * D, num_examples
    )
    data = to_wire(np.asarray(vector, dtype=np.float32))
    for i in range(0, len(data), 12):
        session.add_chunk(data[i : i + 12])
    session.commit()


def test_no_round_until_min_clients_available(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    coord.check_in("a", 0)
    clock.now += 5
    coord.step()
    assert coord.task_for("a") is None
    coord.check_in("b", 0)
    coord.step()  # selection window starts now
    assert coord.task_for("a") is None
    clock.now += 1.5
    coord.step()
    assert coord.task_for("a") is not None and coord.task_for("b") is not None


def test_cohort_is_capped_with_overselection(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock, clients_per_round=2, overselect=0.5)
    tasks = start_round(coord, clock, [f"d{i}" for i in range(6)])
    assert sum(t is not None for t in tasks.values()) == 3


def test_weighted_fedavg_round_creates_a_version(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    upload(coord, "a", tasks["a"], np.full(D, 1.0), num_examples=1)
    upload(coord, "b", tasks["b"], np.full(D, 4.0), num_examples=3)
    assert coord.step() is None  # c still pending, deadline not reached
    upload(coord, "c", tasks["c"], np.full(D, 0.0), num_examples=4)
    summary = coord.step()
    assert summary.status == "completed" and summary.version == 2 and summary.participants == 3
    expected = (1 * 1.0 + 3 * 4.0 + 4 * 0.0) / 8
    np.testing.assert_allclose(store.load_version("m", 2), np.full(D, expected), rtol=1e-6)
    assert store.get_model("m").current_version == 2
    [rnd] = store.list_rounds("m")
    assert rnd.status == "completed" and rnd.result_version == 2 and rnd.bytes_in == 3 * 4 * D


def test_straggler_is_ignored_at_the_deadline(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    upload(coord, "a", tasks["a"], np.ones(D))
    upload(coord, "b", tasks["b"], np.ones(D))
    clock.now += 11
    summary = coord.step()
    assert summary.status == "completed" and summary.participants == 2 and summary.dropouts == 1
    with pytest.raises(FederationError) as err:
        upload(coord, "c", tasks["c"], np.ones(D))
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION


def test_round_fails_cleanly_below_minimum_and_next_round_starts(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    upload(coord, "a", tasks["a"], np.ones(D))
    clock.now += 11
    summary = coord.step()
    assert summary.status == "failed" and "1 update" in summary.failure_reason
    assert store.get_model("m").current_version == 1
    tasks2 = start_round(coord, clock, ["a", "b"])
    assert tasks2["a"].round_id != tasks["a"].round_id and tasks2["a"].round_number == 2


def test_declined_devices_do_not_hold_the_round(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    upload(coord, "a", tasks["a"], np.ones(D))
    upload(coord, "b", tasks["b"], np.ones(D))
    coord.decline("c", tasks["c"].round_id, "privacy budget exceeded")
    summary = coord.step()
    assert summary.status == "completed" and summary.dropouts == 1


def test_bad_uploads_leave_the_aggregate_untouched(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    t = tasks["a"]
    bad_vector = np.ones(D, dtype=np.float32)
    bad_vector[5] = np.nan
    with pytest.raises(FederationError, match="NaN"):
        upload(coord, "a", t, bad_vector)
    session = coord.begin_upload("a", t.round_id, t.model_version, MANIFEST, 4 * D, 1)
    session.add_chunk(b"\x00" * 8)
    with pytest.raises(FederationError, match="truncated"):
        session.commit()
    session.abort()
    wrong = Manifest((TensorInfo("w", (3, 2)), TensorInfo("b", (2,))))
    with pytest.raises(FederationError) as err:
        coord.begin_upload("a", t.round_id, t.model_version, wrong, 4 * D, 1)
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT
    with pytest.raises(FederationError) as err:
        coord.begin_upload("a", t.round_id, t.model_version + 1, MANIFEST, 4 * D, 1)
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT
    with pytest.raises(FederationError) as err:
        coord.begin_upload("zz", t.round_id, t.model_version, MANIFEST, 4 * D, 1)
    assert err.value.kind is ErrorKind.PERMISSION_DENIED
    with pytest.raises(FederationError) as err:
        coord.begin_upload("a", "nope", t.model_version, MANIFEST, 4 * D, 1)
    assert err.value.kind is ErrorKind.NOT_FOUND
    # after all refusals, the device can still upload and the sum is exactly the good ones
    for d in ("a", "b", "c"):
        upload(coord, d, tasks[d], np.full(D, 2.0))
    with pytest.raises(FederationError) as err:
        upload(coord, "a", t, np.full(D, 2.0))
    assert err.value.kind is ErrorKind.ALREADY_EXISTS
    summary = coord.step()
    assert summary.participants == 3
    np.testing.assert_array_equal(store.load_version("m", 2), np.full(D, 2.0, dtype=np.float32))


def test_finishes_after_configured_rounds(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock, rounds=1)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    for d in "abc":
        upload(coord, d, tasks[d], np.zeros(D))
    coord.step()
    assert coord.finished
    assert coord.check_in("a", 0).finished


def test_a_finished_server_knows_which_devices_have_not_heard_it(store: Store) -> None:
    """What `xeno-fl server --rounds N` waits for before it closes its port."""
    from server.runner import ModelRunner

    clock = Clock()
    coord = make(store, clock, rounds=1)
    runner = ModelRunner.single(store, coord)
    for d in "abc":
        assert runner.check_in_now(d, [coord]) is None
    coord.step()
    clock.now += 5
    coord.step()
    tasks = {d: coord.task_for(d) for d in "abc"}
    assert runner.check_in_now("d", [coord]) is None  # came too late for the round
    assert runner.unannounced() == 4
    for d in "abc":
        upload(coord, d, tasks[d], np.zeros(D))
    coord.step()
    assert coord.finished
    outcome = runner.check_in_now("a", [coord])
    assert outcome is not None and outcome.finished
    assert runner.unannounced() == 3  # b, c (still busy after their upload) and d
    runner.leave("d", "stopped")  # a device that said goodbye is not waited for
    assert runner.unannounced() == 2
    for d in "bc":
        runner.check_in_now(d, [coord])
    assert runner.unannounced() == 0


def test_restart_marks_running_round_failed_and_keeps_versions(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    upload(coord, "a", tasks["a"], np.ones(D))
    # the process dies here; a new coordinator starts on the same store
    coord2 = make(store, clock)
    [rnd] = store.list_rounds("m")
    assert rnd.status == "failed" and "restarted" in rnd.failure_reason
    assert coord2.model.current_version == 1
    with pytest.raises(FederationError) as err:
        coord2.begin_upload("a", tasks["a"].round_id, 1, MANIFEST, 4 * D, 1)
    assert err.value.kind is ErrorKind.NOT_FOUND


def test_corrupt_blob_is_detected_on_read(store: Store) -> None:
    from sqlalchemy import update

    from server.store.models import BlobRow

    with store.session() as s, s.begin():
        s.execute(update(BlobRow).values(data=b"\x01" * (4 * D)))
    from server.store import CorruptBlobError

    with pytest.raises(CorruptBlobError):
        store.load_version("m", 1)


# ---------------------------------------------------------------- database failures
def _db_down(*_args, **_kwargs):
    from sqlalchemy.exc import OperationalError

    raise OperationalError("INSERT ...", {}, ConnectionRefusedError("connection refused"))


def _full_round(coord, clock, devices=("a", "b", "c"), value=1.0):
    tasks = start_round(coord, clock, list(devices))
    for d in devices:
        upload(coord, d, tasks[d], np.full(D, value))
    return tasks, coord.step()


def _assert_chain(store: Store) -> None:
    """Versions 1..n in a chain, one per completed round, none twice, nothing running."""
    versions = store.list_versions("m")
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert all(v.parent_version == v.version - 1 for v in versions[1:])
    rounds = store.list_rounds("m")
    completed = [r for r in rounds if r.status == "completed"]
    assert sorted(r.result_version for r in completed) == [v.version for v in versions[1:]]
    assert sorted(v.round_id for v in versions[1:]) == sorted(r.id for r in completed)
    assert not [r for r in rounds if r.status == "running"]


def test_round_end_not_stored_fails_in_memory_and_is_written_once_the_db_answers(
    store: Store, monkeypatch
) -> None:
    clock = Clock()
    coord = make(store, clock, store_retry_s=0.0, stall_grace_s=5)
    _full_round(coord, clock, value=1.0)
    monkeypatch.setattr(store, "complete_round", _db_down)
    monkeypatch.setattr(store, "fail_round", _db_down)
    tasks, summary = _full_round(coord, clock, value=2.0)
    assert summary.status == "failed" and "could not be stored" in summary.failure_reason
    # in memory at once: the round is closed, devices are told so, the model is unchanged
    with pytest.raises(FederationError) as err:
        coord.report_metrics("a", tasks["a"].round_id, {})
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION
    assert coord.model.current_version == 2
    # no new round while the failure is not written: the database may hold more than we know
    for d in "abc":
        coord.check_in(d, 0)
    clock.now += 5
    assert coord.step() is None and coord.task_for("a") is None
    clock.now += 3
    assert "could not be stored" in coord.health_problem()
    monkeypatch.undo()  # the database is back
    clock.now += 3
    coord.step()  # writes the failure, then starts the next round
    failed = store.list_rounds("m")[1]
    assert failed.status == "failed" and "could not be stored" in failed.failure_reason
    for d in "abc":
        upload(coord, d, coord.task_for(d), np.full(D, 3.0))
    summary = coord.step()
    assert summary.status == "completed" and summary.version == 3
    # version 2 (1.0) plus this round's mean update; the failed round's 2.0 is nowhere
    np.testing.assert_array_equal(store.load_version("m", 3), np.full(D, 4.0, np.float32))
    assert coord.health_problem() == ""
    _assert_chain(store)


def test_commit_whose_acknowledgement_was_lost_is_adopted_not_redone(
    store: Store, monkeypatch
) -> None:
    """The connection drops during COMMIT: the version exists, the caller saw an error."""
    clock = Clock()
    coord = make(store, clock, store_retry_s=0.0)
    real_complete = store.complete_round

    def commit_then_lose_the_reply(*args, **kwargs):
        real_complete(*args, **kwargs)
        _db_down()

    monkeypatch.setattr(store, "complete_round", commit_then_lose_the_reply)
    monkeypatch.setattr(store, "fail_round", _db_down)
    _, summary = _full_round(coord, clock, value=1.0)
    assert summary.status == "failed"  # as far as anyone could tell at the time
    monkeypatch.undo()
    clock.now += 3
    coord.step()  # settles: the round turns out completed, and its version is adopted
    assert coord.model.current_version == 2
    _, summary = _full_round(coord, clock, value=0.5)
    assert summary.status == "completed" and summary.version == 3
    # version 3 is version 2 plus the mean update: version 2 was applied exactly once
    np.testing.assert_array_equal(store.load_version("m", 3), np.full(D, 1.5, np.float32))
    _assert_chain(store)


def test_transient_write_errors_are_retried(store: Store, monkeypatch) -> None:
    clock = Clock()
    coord = make(store, clock, store_retry_s=5.0)
    real_complete = store.complete_round
    failures = iter([True, True, False])

    def flaky(*args, **kwargs):
        if next(failures):
            _db_down()
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(store, "complete_round", flaky)
    _, summary = _full_round(coord, clock)
    assert summary.status == "completed" and summary.version == 2
    _assert_chain(store)


def test_round_start_that_cannot_be_written_is_retried_with_the_same_devices(
    store: Store, monkeypatch
) -> None:
    clock = Clock()
    coord = make(store, clock, stall_grace_s=2)
    monkeypatch.setattr(store, "start_round", _db_down)
    for d in "abc":
        coord.check_in(d, 0)
    coord.step()
    clock.now += 5
    coord.step()
    assert coord.task_for("a") is None
    assert "no round has started" in coord.health_problem()
    monkeypatch.undo()
    clock.now += 3
    coord.step()  # the failed start is settled (its row never committed)
    coord.step()
    assert all(coord.task_for(d) is not None for d in "abc")  # still available
    assert coord.health_problem() == ""
    for d in "abc":
        upload(coord, d, coord.task_for(d), np.ones(D))
    assert coord.step().status == "completed"
    _assert_chain(store)


def test_any_exception_while_closing_fails_the_round_and_the_next_one_runs(
    store: Store,
) -> None:
    clock = Clock()
    broken = {"on": True}

    def evaluator(vector):
        if broken["on"]:
            raise MemoryError("evaluation ran out of memory")
        return {"accuracy": 1.0}

    coord = RoundCoordinator(
        store,
        "m",
        FedAvg(),
        RoundConfig(min_clients=2, clients_per_round=3, round_deadline_s=10, selection_window_s=1),
        evaluator=evaluator,
        clock=clock,
        rng=random.Random(0),
    )
    _, summary = _full_round(coord, clock)
    assert summary.status == "failed" and "MemoryError" in summary.failure_reason
    assert store.list_rounds("m")[0].status == "failed"
    broken["on"] = False
    _, summary = _full_round(coord, clock)
    assert summary.status == "completed" and summary.version == 2
    _assert_chain(store)


def test_failed_round_leaves_the_server_optimizer_state_as_it_was(
    store: Store, monkeypatch
) -> None:
    from server.strategies import FedAdam

    clock = Clock()
    strategy = FedAdam(server_lr=0.1)
    coord = RoundCoordinator(
        store,
        "m",
        strategy,
        RoundConfig(
            min_clients=2,
            clients_per_round=3,
            round_deadline_s=10,
            selection_window_s=1,
            store_retry_s=0.0,
        ),
        clock=clock,
        rng=random.Random(0),
    )
    _full_round(coord, clock)
    before = {k: v.copy() for k, v in strategy.state_dict().items()}
    monkeypatch.setattr(store, "complete_round", _db_down)
    _, summary = _full_round(coord, clock, value=5.0)
    assert summary.status == "failed"
    for key, value in strategy.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_a_dead_driver_and_a_round_past_its_deadline(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock, stall_grace_s=2)
    tasks = start_round(coord, clock, ["a", "b", "c"])
    assert tasks["a"] is not None and coord.health_problem() == ""
    clock.now += 10 + 3  # nobody drives the round to its close
    assert "past its deadline" in coord.health_problem()

    def die() -> None:
        raise SystemExit("driver bug")

    coord.step = die  # type: ignore[method-assign]
    coord.start()
    coord._driver.join(timeout=5)
    assert coord.health_problem() == "the round driver thread has died"


# ---------------------------------------------------------------- retention
def test_retention_keeps_newest_every_kth_tagged_and_restored_versions(store: Store) -> None:
    from sqlalchemy import func, select

    from server.lifecycle.versions import VersionControl
    from server.store.models import BlobRow, ModelVersionRow

    clock = Clock()
    coord = make(store, clock, keep_versions=3, keep_every=4, retention_batch=2)
    vcs = VersionControl(store)
    _full_round(coord, clock, value=1.0)  # version 2
    vcs.tag("m", 2, "launch")
    _full_round(coord, clock, value=2.0)  # 3
    _full_round(coord, clock, value=3.0)  # 4
    assert vcs.rollback("m", 3, created_by="operator", reason="4 is bad") == 5
    for value in range(4, 11):  # rounds go on from the rollback's head: versions 6..12
        _full_round(coord, clock, value=float(value))
    kept = [v.version for v in store.list_versions("m")]
    # every 4th from 1 (1, 5, 9), tagged 2, restored 3, the newest 3 (10, 11, 12)
    assert kept == [1, 2, 3, 5, 9, 10, 11, 12]
    # the deleted versions' blobs are gone; every kept version still loads
    with store.session() as s:
        blobs = s.scalar(select(func.count()).select_from(BlobRow))
        used = s.scalar(select(func.count(func.distinct(ModelVersionRow.blob_sha256))))
    assert blobs == used
    for version in kept:
        store.load_version("m", version)
    # the next round trains from the head as usual
    _, summary = _full_round(coord, clock, value=1.0)
    assert summary.status == "completed" and summary.version == 13


def test_retention_is_off_with_keep_versions_zero(store: Store) -> None:
    clock = Clock()
    coord = make(store, clock, keep_versions=0, keep_every=0)
    for value in range(4):
        _full_round(coord, clock, value=float(value))
    assert [v.version for v in store.list_versions("m")] == [1, 2, 3, 4, 5]
