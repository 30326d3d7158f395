"""The Privacy tab."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from xeno.ui.backend import Session
from xeno.ui.widgets import MessageBar


class PrivacyTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addWidget(QLabel("Privacy"), 1)

    def refresh(self) -> None:
        pass
