"""The desktop app (xeno-fl ui) driven as a user would, with pytest-qt under offscreen Qt.

Each test works on its own user store and SQLite database in tmp_path and checks what the
window shows against the APIs it calls (the store, the lifecycle, the accountants).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt

from xeno.ui.app import TAB_NAMES, MainWindow
from xeno.ui.backend import Session


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session.open("alice", home=tmp_path / "home", db=f"sqlite:///{tmp_path}/xeno.db")
    yield s
    s.close()


@pytest.fixture
def window(qtbot, session: Session) -> MainWindow:  # type: ignore[no-untyped-def]
    w = MainWindow(session)
    qtbot.addWidget(w)
    w.show()
    return w


def test_window_has_the_five_tabs_and_resizes(window: MainWindow) -> None:
    assert [window.tabs.tabText(i).split(" ", 1)[1] for i in range(5)] == list(TAB_NAMES)
    assert (window.minimumWidth(), window.minimumHeight()) == (1024, 700)
    window.resize(1600, 1000)
    assert window.tabs.width() > 1500


def test_changing_a_preference_changes_the_preview(qtbot, window: MainWindow) -> None:  # type: ignore[no-untyped-def]
    tab = window.personalization
    before = tab.preview.toPlainText()
    assert "Give moderately detailed answers." in before
    combo = tab.selectors["detail_level"]
    combo.setFocus()
    combo.setCurrentIndex(combo.findData("brief"))
    after = tab.preview.toPlainText()
    assert "Keep answers brief" in after and after != before
    # Stored explicitly: a fresh engine over the same store sees it.
    assert window.session.engine.explicit_preferences()["detail_level"] == "brief"
    row = [tab.in_force.item(1, c).text() for c in range(3)]
    assert row == ["Detail level", "Brief", "explicit"]
    # Back to automatic: the explicit choice is forgotten.
    combo.setCurrentIndex(0)
    assert "detail_level" not in window.session.engine.explicit_preferences()
    assert "Give moderately detailed answers." in tab.preview.toPlainText()


def _write_examples(path: Path, n_per_intent: int, bad_line: bool) -> int:
    """A CSV of n_per_intent examples of three intents; optionally one bad row (no intent)."""
    import csv

    from common.data.clinc150 import load_clinc150

    data = load_clinc150()
    rows: list[dict[str, str]] = []
    for name in ("timer", "weather", "play_music"):
        k = data.intents.index(name)
        texts = [t for t, y in zip(data.train.texts, data.train.labels, strict=True) if y == k]
        rows += [{"input_text": t, "intent": name, "rating": ""} for t in texts[:n_per_intent]]
    bad = 0
    if bad_line:
        rows.insert(3, {"input_text": "remind me of nothing", "intent": "", "rating": ""})
        rows.insert(5, {"input_text": "set a timer", "intent": "timer", "rating": "9"})
        bad = 2
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["input_text", "intent", "rating"])
        writer.writeheader()
        writer.writerows(rows)
    return bad


def test_import_shows_the_bad_rows_then_training_shows_the_accuracy(
    qtbot, window: MainWindow, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    window.tabs.setCurrentIndex(1)
    tab = window.training
    path = tmp_path / "examples.csv"
    _write_examples(path, 20, bad_line=True)
    tab.load_file(path)
    # Lines: 1 header, rows from 2; the inserted bad rows are the 4th and 6th data rows.
    errors = {
        int(tab.errors.item(r, 0).text()): tab.errors.item(r, 1).text()
        for r in range(tab.errors.rowCount())
    }
    assert errors == {5: "no intent", 7: "rating '9' is not a whole number from 1 to 5"}
    assert tab.preview.rowCount() == 60
    assert "2 of 62 rows" in tab.bar.label.text()
    qtbot.mouseClick(tab.add_button, Qt.MouseButton.LeftButton)
    assert len(window.session.trainer.labelled_examples()) == 60
    assert "60 labelled examples of 3 intents" in tab.store_label.text()

    qtbot.mouseClick(tab.train_button, Qt.MouseButton.LeftButton)
    assert not tab.train_button.isEnabled() and tab.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    versions = window.session.trainer.versions()
    assert [v["version"] for v in versions] == [1] and versions[0]["active"]
    shown = {tab.result.item(r, 0).text(): tab.result.item(r, 1).text() for r in range(6)}
    stored = versions[0]["metrics"]
    assert float(shown["validation accuracy"]) == pytest.approx(stored["accuracy"], abs=1e-4)
    assert shown["examples used"] == "60"
    assert tab.progress.value() == 100
    assert "validation accuracy" in tab.bar.label.text()


def test_training_with_too_few_examples_says_what_to_do(qtbot, window: MainWindow) -> None:  # type: ignore[no-untyped-def]
    tab = window.training
    window.session.trainer.add_training_example("set a timer", "", {"intent": "timer"})
    tab.start_training()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    assert tab.bar.kind == "error"
    assert "Need at least 50 training examples" in tab.bar.label.text()
    assert "Import more labelled examples" in tab.bar.label.text()
    assert window.session.trainer.versions() == []


def test_cancelling_training_stores_nothing(qtbot, window: MainWindow) -> None:  # type: ignore[no-untyped-def]
    tab = window.training
    tab.start_training()
    tab.cancel_running()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=30_000)
    assert "cancelled" in tab.log.toPlainText()
    assert window.session.trainer.versions() == []
    assert tab.train_button.isEnabled()


def _model_with_versions(session: Session) -> list[int]:
    """Model 'm' (a tiny MLP) with three versions carrying an accuracy."""
    from common.models import ModelSpec, build_model
    from xeno.model_versioning import ModelVersionControl

    mvc = ModelVersionControl(store=session.db_store)
    made = []
    for i, acc in enumerate((0.5, 0.7, 0.6)):
        net = build_model(
            ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2}), seed=i
        )
        made.append(mvc.create_version("m", net, "test", f"v{i + 1}", {"accuracy": acc}))
    return made


def test_rollback_asks_what_will_happen_and_moves_the_head(window: MainWindow) -> None:
    from xeno.model_versioning import ModelVersionControl

    assert _model_with_versions(window.session) == [1, 2, 3]
    window.tabs.setCurrentIndex(3)
    tab = window.versions
    tab.refresh()
    assert tab.head.text() == "head: v3"
    assert [tab.table.item(r, 0).text() for r in range(3)] == ["3", "2", "1"]
    asked: list[str] = []
    tab.confirm = lambda title, text: asked.append(text) or False  # the user says Cancel
    tab.table.selectRow(1)  # version 2
    tab.rollback_button.click()
    assert "version 4 will become the head, with the weights of version 2" in asked[0]
    assert tab.head.text() == "head: v3"  # cancelled: nothing happened
    tab.confirm = lambda title, text: True
    tab.table.selectRow(1)
    tab.rollback_button.click()
    assert tab.head.text() == "head: v4"
    mvc = ModelVersionControl(store=window.session.db_store)
    head = mvc.get_version("m")
    assert head["version"] == 4
    weights_4 = mvc.load_state_dict("m", 4)
    weights_2 = mvc.load_state_dict("m", 2)
    assert all((weights_4[k] == weights_2[k]).all() for k in weights_2)


def test_compare_shows_metric_changes_and_weight_distance(window: MainWindow) -> None:
    import numpy as np

    from xeno.model_versioning import ModelVersionControl

    _model_with_versions(window.session)
    tab = window.versions
    tab.refresh()
    tab.version_a.setCurrentIndex(tab.version_a.findData(1))
    tab.version_b.setCurrentIndex(tab.version_b.findData(2))
    tab.compare_button.click()
    row = [tab.comparison.item(0, c).text() for c in range(5)]
    assert row[0] == "accuracy" and row[4] == "+40.00%"
    mvc = ModelVersionControl(store=window.session.db_store)
    a = np.concatenate([t.numpy().ravel() for t in mvc.load_state_dict("m", 1).values()])
    b = np.concatenate([t.numpy().ravel() for t in mvc.load_state_dict("m", 2).values()])
    assert f"L2 distance {np.linalg.norm(b - a):.4g}" in tab.distance.text()


def test_a_server_that_is_not_there_is_an_error_in_the_window(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = Session.open("bob", home=tmp_path / "home", server=f"127.0.0.1:{port}")
    w = MainWindow(session)
    qtbot.addWidget(w)
    w.tabs.setCurrentIndex(3)
    text = w.versions.bar.label.text()
    assert f"127.0.0.1:{port} cannot be reached" in text
    assert "What to do: Check that it runs (xeno-fl server)" in text
    session.close()


def test_performance_shows_the_metrics_with_the_trend_verdict(window: MainWindow) -> None:
    from xeno.model_versioning import PerformanceTracker

    _model_with_versions(window.session)
    tracker = PerformanceTracker(store=window.session.db_store)
    for i in range(10):
        tracker.record_metric("m", "accuracy", 0.5 + 0.03 * i)
        tracker.record_metric("m", "loss", 1.0 + 0.1 * (i % 2))
    window.tabs.setCurrentIndex(2)
    tab = window.performance
    rows = {
        tab.metrics.item(r, 0).text(): [tab.metrics.item(r, c).text() for c in range(8)]
        for r in range(tab.metrics.rowCount())
    }
    stats = tracker.get_trend_statistics("m", "accuracy")
    assert rows["accuracy"][1] == "0.77" and rows["accuracy"][5] == "10"
    assert rows["accuracy"][6] == "improving" == stats["trend"]
    assert float(rows["accuracy"][7]) == pytest.approx(stats["p_value"], abs=1e-4)
    assert rows["loss"][6] == tracker.get_trend("m", "loss")
    chart = tab.charts["accuracy"]
    assert chart.values == pytest.approx([0.5 + 0.03 * i for i in range(10)])
    assert chart.verdict == "improving"


def test_ab_test_create_watch_and_end_with_a_winner(window: MainWindow) -> None:
    from xeno.model_versioning import ABTestingManager, ModelVersionControl

    _model_with_versions(window.session)
    window.tabs.setCurrentIndex(2)
    tab = window.performance
    tab.test_name.setText("t1")
    assert (tab.arm_a.currentText(), tab.arm_b.currentText()) == ("m:2", "m:3")
    tab.create_button.click()
    assert tab.tests.item(0, 0).text() == "t1" and tab.tests.item(0, 1).text() == "running"
    ab = ABTestingManager(store=window.session.db_store)
    for i in range(6):
        ab.record_result("t1", "variant_a", {"accuracy": 0.50 + 0.01 * i})
        ab.record_result("t1", "variant_b", {"accuracy": 0.70 + 0.01 * i})
    tab.tests.clearSelection()
    tab.select_test("t1")
    row = [tab.analysis.item(0, c).text() for c in range(9)]
    assert row[:3] == ["accuracy", "6", "6"] and row[8] == "variant_b"
    asked: list[str] = []
    tab.confirm = lambda title, text: asked.append(text) or True
    tab.winner.setCurrentIndex(tab.winner.findData("variant_b"))
    tab.end_button.click()
    assert "variant B's version is tagged 'production'" in asked[0]
    assert ab.get_test("t1")["status"] == "ended"
    assert tab.tests.item(0, 1).text() == "ended" and tab.tests.item(0, 6).text() == "variant_b"
    assert ModelVersionControl(store=window.session.db_store).get_tags("m") == {"production": 3}


def test_privacy_consent_is_recorded_and_the_budget_consequence_is_the_accountants(
    window: MainWindow,
) -> None:
    from client.assistant import consent
    from common.privacy import gaussian_epsilon

    window.tabs.setCurrentIndex(4)
    tab = window.privacy
    store = window.session.store
    assert not tab.federated.isChecked()
    tab.federated.click()
    assert consent.given(store, consent.Scope.FEDERATED_TRAINING)
    tab.federated.click()
    assert not consent.given(store, consent.Scope.FEDERATED_TRAINING)
    assert [tab.consents.item(r, 1).text() for r in range(2)] == ["yes", "withdrawn"]

    tab.min_noise.setValue(5.0)
    tab.budget.setValue(40)  # epsilon 4.0
    tab.update_consequence()
    text = tab.consequence.text()
    n = int(text.split("at most ")[1].split(" rounds")[0])
    # The largest round count within the budget, by the accountant itself.
    assert n > 1
    assert gaussian_epsilon(5.0, 1.0, n, 1e-5) <= 4.0 < gaussian_epsilon(5.0, 1.0, n + 1, 1e-5)
    assert "--max-user-epsilon 4" in tab.device_flags.text()
    tab.min_noise.setValue(0.5)
    tab.update_consequence()
    assert "the device would decline every task" in tab.consequence.text()


def test_export_then_delete_needs_the_typed_user_id(
    qtbot, window: MainWindow, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import json

    from client.assistant.keys import UserPaths

    window.session.engine.update_preference("tone", "formal")
    window.tabs.setCurrentIndex(4)
    tab = window.privacy
    out = tmp_path / "alice.json"
    tab.export_to(out)
    archive = json.loads(out.read_text())
    assert archive["user_id"] == "alice"
    assert {"key": "tone", "value": "formal"}.items() <= archive["store"]["preferences"][0].items()
    assert out.stat().st_mode & 0o777 == 0o600

    paths = UserPaths(window.session.home, "alice")
    assert paths.database.exists()
    qtbot.keyClicks(tab.confirm_text, "alic")
    assert not tab.delete_button.isEnabled()
    qtbot.keyClicks(tab.confirm_text, "e")
    assert tab.delete_button.isEnabled()
    tab.confirm = lambda title, text: False
    tab.delete_button.click()
    assert paths.database.exists()  # declined in the dialog: nothing deleted
    assert tab.confirm_text.text() == "alice"  # still typed: the user may go on
    tab.confirm = lambda title, text: True
    tab.delete_button.click()
    assert not paths.database.exists() and not paths.wrapped_key.exists()
    assert "deleted from this device" in tab.bar.label.text()
    # Nothing reopens (and so recreates) the store afterwards.
    window.personalization.refresh()
    assert "was deleted" in window.personalization.bar.label.text()
    assert not paths.database.exists()


@pytest.mark.slow
def test_demo_screenshots_and_the_benchmark_run_from_the_command_line(tmp_path: Path) -> None:
    """`xeno-fl ui --demo --screenshot DIR`: a real demo federation, one 1024x700 PNG per tab."""
    import json
    import os
    import struct
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.pop("XENO_DEVICE_KEY", None)  # the demo keeps its own device key file
    home, shots = tmp_path / "demo", tmp_path / "shots"
    cli = [sys.executable, "-m", "xeno.cli", "ui", "--demo", "--home", str(home), "--user", "demo"]
    done = subprocess.run(
        [*cli, "--screenshot", str(shots)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in shots.iterdir())
    assert names == [f"{i + 1}-{n.lower()}.png" for i, n in enumerate(TAB_NAMES)]
    for name in names:
        head = (shots / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", head[16:24]) == (1024, 700)
    # The demo's federation is real: two DP rounds in the model's privacy ledger.
    s = Session.open("demo", home=home, db=f"sqlite:///{home}/xeno.db")
    try:
        from common.pb import admin_pb2 as pb

        report = s.admin(
            "GetPrivacyReport", pb.GetPrivacyReportRequest(model_name="intents-fasttext")
        )
        assert [e.round_number for e in report.entries] == [1, 2]
    finally:
        s.close()
    bench = subprocess.run(
        [
            sys.executable,
            "benchmarks/ui.py",
            "--home",
            str(home),
            "--repeats",
            "1",
            "--switches",
            "5",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    line = json.loads(bench.stdout.strip())
    assert line["switches"] == 5 and line["open_s_median"] > 0


def test_over_a_running_server_with_a_token(qtbot, server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--server: the Versions tab rolls back over gRPC; a wrong token says what to do."""
    import argparse

    server = server_factory(admin_token="s3cret-admin-token")
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-admin-token\n")
    token_file.chmod(0o600)
    bad = Session.open(
        "carol",
        home=tmp_path / "home",
        server=server.address,
        admin_args=argparse.Namespace(token="wrong-token"),
    )
    w = MainWindow(bad)
    qtbot.addWidget(w)
    w.tabs.setCurrentIndex(3)
    text = w.versions.bar.label.text()
    assert "refused the admin credentials" in text and "--token-file" in text
    bad.close()

    good = Session.open(
        "carol",
        home=tmp_path / "home",
        server=server.address,
        admin_args=argparse.Namespace(token_file=str(token_file)),
    )
    w = MainWindow(good)
    qtbot.addWidget(w)
    w.tabs.setCurrentIndex(3)
    tab = w.versions
    assert tab.bar.kind == ""
    model = tab.model.currentData()
    assert model == server.config.model and tab.head.text() == "head: v1"
    tab.confirm = lambda title, text: True
    tab.table.selectRow(0)
    tab.rollback_button.click()  # to the head itself: the server refuses, the window says why
    assert "version 1 is already the head" in tab.bar.label.text()
    from xeno.model_versioning import ModelVersionControl

    mvc = ModelVersionControl(store=server.store)
    state = mvc.load_state_dict(model)
    mvc.create_version(model, {k: v + 1 for k, v in state.items()}, "test", "v2")
    tab.refresh()
    assert tab.head.text() == "head: v2"
    tab.table.selectRow(1)  # version 1
    tab.rollback_button.click()
    assert tab.head.text() == "head: v3", tab.bar.label.text()
    assert server.store.get_model(model).current_version == 3
    assert mvc.get_version(model, 3)["rollback_of"] == 1
    good.close()


def test_keyboard_moves_through_a_tab_in_reading_order(qtbot, window: MainWindow) -> None:  # type: ignore[no-untyped-def]
    tab = window.personalization
    window.activateWindow()
    tab.selectors["communication_style"].setFocus()
    qtbot.keyClick(tab.selectors["communication_style"], Qt.Key.Key_Tab)
    assert tab.learning["communication_style"].hasFocus()
    qtbot.keyClick(tab.learning["communication_style"], Qt.Key.Key_Tab)
    assert tab.selectors["detail_level"].hasFocus()
    # Ctrl+Tab goes to the next tab.
    qtbot.keyClick(window.tabs, Qt.Key.Key_Tab, Qt.KeyboardModifier.ControlModifier)
    assert window.tabs.currentIndex() == 1


def test_personalizing_a_federated_model_uses_its_body(
    qtbot, window: MainWindow, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from common.models import ModelSpec, build_model
    from xeno.model_versioning import ModelVersionControl

    spec = ModelSpec("fasttext", {"buckets": 512, "dim": 8, "num_classes": 3})
    ModelVersionControl(store=window.session.db_store).create_version(
        "intents-small", build_model(spec, seed=0), "test", "federated"
    )
    path = tmp_path / "examples.csv"
    _write_examples(path, 18, bad_line=False)
    window.tabs.setCurrentIndex(1)
    tab = window.training
    tab.load_file(path)
    tab.add_button.click()
    tab.model.setCurrentIndex(tab.model.findData("intents-small"))
    assert "--model" in tab.command() and "intents-small" in tab.command()
    tab.start_training()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    (version,) = window.session.trainer.versions()
    assert version["body"] == "intents-small-v1"
    body = {tab.result.item(r, 0).text(): tab.result.item(r, 1).text() for r in range(6)}["body"]
    assert body == "intents-small-v1"


def test_training_settings_reach_the_trainer(qtbot, window: MainWindow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Adam for 1 epoch at lr 1e-4 moves the head far less than automatic L-BFGS does.

    Both runs start from zero weights (separate users' stores would differ, so the mini-batch
    run goes first and the L-BFGS run is warm-started from it: it converges to the same
    optimum regardless). The reference for the mini-batch run is the bound of its updates:
    Adam moves each weight by at most about lr per step, 6 steps (48 examples / batch 8).
    """
    import numpy as np

    tab = window.training
    path = tmp_path / "examples.csv"
    _write_examples(path, 20, bad_line=False)
    tab.load_file(path)
    qtbot.mouseClick(tab.add_button, Qt.MouseButton.LeftButton)
    assert not tab.learning_rate.isEnabled()
    tab.optimizer.setCurrentIndex(tab.optimizer.findData("adam"))
    assert tab.learning_rate.isEnabled() and tab.epochs.isEnabled() and tab.batch.isEnabled()
    tab.learning_rate.setValue(0.0001)
    tab.epochs.setValue(1)
    tab.batch.setValue(8)
    tab.start_training()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    assert tab.bar.kind != "error", tab.bar.label.text()
    assert "adam lr=0.0001 epochs=1 batch=8" in tab.log.toPlainText()
    trainer = window.session.trainer
    slow = trainer.active_head()
    assert slow is not None
    # Two fits (80% then all), 6 and 8 steps of at most ~lr each, on the learned columns: the
    # body's pretrained columns hold its nearest-centroid prior, which is not trained, and the
    # learned ones are stored times the gain that restores their unit norm.
    from client.assistant.intents import pretrained_columns

    columns = pretrained_columns(trainer.body)
    learned = np.ones(slow.weights.shape[0], dtype=bool)
    for cols, _norm in columns:
        learned[cols] = False
    gain = 1 / np.sqrt(1 - sum(norm * norm for _cols, norm in columns))
    assert float(np.abs(slow.weights[learned]).max()) <= 14 * 1e-4 * 1.01 * gain
    slow_metrics = trainer.versions()[0]["metrics"]

    tab.optimizer.setCurrentIndex(tab.optimizer.findData("lbfgs"))
    tab.start_training()
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    fast = trainer.active_head()
    assert fast is not None
    assert float(np.abs(fast.weights[learned]).max()) > 100 * float(
        np.abs(slow.weights[learned]).max()
    )
    fast_metrics = next(v for v in trainer.versions() if v["active"])["metrics"]
    # Each version records its own fit (the body's centroid prior makes even the barely
    # trained head confident, so the unknown thresholds need not differ in one direction).
    assert slow_metrics["examples_used"] == fast_metrics["examples_used"] == 60


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", 0.0, "learning rate must be in (0, 10], got 0.0"),
        ("epochs", 0, "epochs must be between 1 and 10000, got 0"),
        ("batch", 0, "batch size must be between 1 and 1000000, got 0"),
    ],
)
def test_bad_training_settings_are_an_error_in_the_window(  # type: ignore[no-untyped-def]
    qtbot, window: MainWindow, field: str, value: float, message: str
) -> None:
    tab = window.training
    tab.optimizer.setCurrentIndex(tab.optimizer.findData("sgd"))
    getattr(tab, field).setValue(value)
    tab.start_training()
    assert tab.worker is None
    assert tab.bar.kind == "error"
    assert message in tab.bar.label.text()
    assert "choose automatic (L-BFGS)" in tab.bar.label.text()
    assert window.session.trainer.versions() == []


def test_saved_dp_limits_are_what_the_client_enforces(  # type: ignore[no-untyped-def]
    qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.runtime import ClientConfig
    from common.config import from_namespace
    from xeno.cli import build_parser, client_config

    for env in ("XENO_MIN_NOISE_MULTIPLIER", "XENO_MAX_USER_EPSILON", "XENO_USER"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("XENO_HOME", str(window.session.home))
    parser = build_parser("client")

    def protection(*flags: str):  # type: ignore[no-untyped-def]
        return client_config(parser.parse_args(["client", *flags])).protection()

    # Nothing saved yet: the client's own defaults.
    defaults = from_namespace(ClientConfig, parser.parse_args(["client"])).protection()
    assert protection("--user", "alice") == defaults

    window.tabs.setCurrentIndex(4)
    tab = window.privacy
    tab.min_noise.setValue(1.5)
    tab.budget.setValue(30)  # epsilon 3.0
    qtbot.mouseClick(tab.save_limits, Qt.MouseButton.LeftButton)
    assert tab.bar.kind != "error", tab.bar.label.text()
    assert "Saved for this device" in tab.bar.label.text()
    assert "xeno-fl client --user alice" in tab.device_flags.text()

    got = protection("--user", "alice")
    assert (got.min_noise_multiplier, got.max_user_epsilon) == (1.5, 3.0)
    assert got.wants_user_dp  # a budget declines tasks without verifiable user-level DP
    # Flags (and their environment variables) override what is saved, one by one.
    got = protection("--user", "alice", "--min-noise-multiplier", "0.7")
    assert (got.min_noise_multiplier, got.max_user_epsilon) == (0.7, 3.0)
    monkeypatch.setenv("XENO_MAX_USER_EPSILON", "9")
    got = protection("--user", "alice")
    assert (got.min_noise_multiplier, got.max_user_epsilon) == (1.5, 9.0)
    monkeypatch.delenv("XENO_MAX_USER_EPSILON")
    # Another user's device is not bound by alice's limits, and no store is created for it.
    assert protection("--user", "bob") == defaults
    assert not (window.session.home / "users" / "bob").exists()

    # A new window over the same store shows what was saved.
    again = MainWindow(window.session)
    qtbot.addWidget(again)
    again.privacy.refresh()
    assert again.privacy.min_noise.value() == 1.5 and again.privacy.epsilon() == 3.0


def test_client_help_says_flags_override_the_saved_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from xeno.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("client").parse_args(["client", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the DP limits saved for that user in the app's Privacy tab" in text
    assert "--max-user-epsilon (or their environment variables) override them" in text
