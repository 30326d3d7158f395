"""Small widgets the tabs share: the message bar, guarded actions, table filling."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from xeno.ui.backend import UiError

log = logging.getLogger("xeno.ui")
T = TypeVar("T")

# What the APIs raise when they refuse something: shown, never a crash.
EXPECTED: tuple[type[BaseException], ...] = (
    UiError,
    ValueError,
    LookupError,
    RuntimeError,
    PermissionError,
    OSError,
)


class MessageBar(QWidget):
    """A strip at the top of a tab: the last error (with what to do next) or confirmation."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.close_button = QPushButton("Dismiss")
        self.close_button.clicked.connect(self.clear)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.close_button)
        self.kind = ""
        self.hide()

    def error(self, message: str, hint: str = "") -> None:
        self._show("error", message + (f"\nWhat to do: {hint}" if hint else ""))

    def info(self, message: str) -> None:
        self._show("info", message)

    def _show(self, kind: str, text: str) -> None:
        self.kind = kind
        color = (
            "#fde8e8; border: 1px solid #d33"
            if kind == "error"
            else "#e8f4fd; border: 1px solid #39c"
        )
        self.setStyleSheet(f"QLabel {{ background: {color}; padding: 6px; }}")
        self.label.setText(text)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() or self.kind else ""

    def clear(self) -> None:
        self.kind = ""
        self.label.setText("")
        self.hide()


def guarded(bar: MessageBar, action: Callable[[], T], hint: str = "") -> T | None:
    """Run action; show an expected refusal in the bar instead of raising. None on failure."""
    try:
        return action()
    except UiError as exc:
        bar.error(exc.message, exc.hint or hint)
    except EXPECTED as exc:
        bar.error(str(exc), hint)
    except Exception as exc:  # a bug must not take the window down with it
        log.exception("unexpected error in the UI")
        bar.error(
            f"Unexpected error: {type(exc).__name__}: {exc}",
            "This is a bug; the details are in the log. The app keeps running.",
        )
    return None


def reload_models(
    combo: QComboBox, bar: MessageBar, fetch: Callable[[], Sequence[Any]]
) -> list[Any]:
    """Refill a model chooser from `fetch`, keeping the chosen model; the models (none on error).

    Signals are blocked meanwhile so that refilling does not look like the user's choice.
    """
    current = combo.currentData()
    models = list(guarded(bar, fetch) or [])
    combo.blockSignals(True)
    combo.clear()
    for m in models:
        combo.addItem(m.name, m.name)
    combo.setCurrentIndex(max(0, combo.findData(current)))
    combo.blockSignals(False)
    return models


def fill_table(table: QTableWidget, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Replace a table's contents; numbers are right-aligned and sort as numbers."""
    table.setSortingEnabled(False)
    table.clear()
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem()
            if isinstance(value, float):
                item.setData(Qt.ItemDataRole.DisplayRole, round(value, 4))
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            elif isinstance(value, int) and not isinstance(value, bool):
                item.setData(Qt.ItemDataRole.DisplayRole, value)
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            else:
                item.setText("" if value is None else str(value))
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            table.setItem(r, c, item)
    header = table.horizontalHeader()
    # Few columns share the width; many keep their content width and scroll.
    many = len(headers) > 5
    mode = QHeaderView.ResizeMode.ResizeToContents if many else QHeaderView.ResizeMode.Stretch
    header.setSectionResizeMode(mode)
    if not many and rows and all(isinstance(r[0], int) for r in rows):
        # A numeric key (line, version) needs only its digits; text gets the width.
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(True)
    table.setHorizontalScrollBarPolicy(
        Qt.ScrollBarPolicy.ScrollBarAsNeeded if many else Qt.ScrollBarPolicy.ScrollBarAlwaysOff
    )


def tab_chain(widgets: Sequence[QWidget]) -> None:
    """Tab moves through widgets in this order (reading order, not creation order)."""
    for a, b in itertools.pairwise(widgets):
        QWidget.setTabOrder(a, b)


def make_table() -> QTableWidget:
    table = QTableWidget()
    table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
    table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    table.setAlternatingRowColors(True)
    table.verticalHeader().setVisible(False)
    table.setWordWrap(False)
    return table
