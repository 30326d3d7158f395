"""The desktop app (xeno-fl ui) driven as a user would, with pytest-qt under offscreen Qt.

Each test works on its own user store and SQLite database in tmp_path and checks what the
window shows against the APIs it calls (the store, the lifecycle, the accountants).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")


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
