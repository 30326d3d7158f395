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
