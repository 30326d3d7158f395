"""The Versions tab: the federation's global versions and the user's personal versions.

Rollback (a new head with an older version's weights; history is kept),
comparison of two versions (metric changes and weight distance) through the
admin API, and restore of a personal version (`CustomModelTrainer.rollback`).
Every change asks first, saying what will happen.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from common.pb import admin_pb2 as pb
from xeno.ui.backend import Session
from xeno.ui.widgets import MessageBar, fill_table, guarded, make_table, reload_models, tab_chain

Confirm = Callable[[str, str], bool]


def ask(parent: QWidget) -> Confirm:
    def confirm(title: str, text: str) -> bool:
        answer = QMessageBox.question(
            parent,
            title,
            text,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Yes

    return confirm


def when(unix_ms: int | float) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


class VersionsTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        self.confirm: Confirm = ask(self)
        self._versions: list[Any] = []

        glob = QGroupBox("Global versions (the federation's model)")
        g = QGridLayout(glob)
        top = QHBoxLayout()
        top.addWidget(QLabel("Model:"))
        self.model = QComboBox()
        self.model.setObjectName("versions_model")
        self.model.currentIndexChanged.connect(lambda _i: self._load_versions())
        top.addWidget(self.model, 1)
        self.head = QLabel()
        self.head.setObjectName("head")
        top.addWidget(self.head)
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        top.addWidget(self.refresh_button)
        g.addLayout(top, 0, 0, 1, 2)
        self.table = make_table()
        self.table.setObjectName("global_versions")
        g.addWidget(self.table, 1, 0, 1, 2)
        self.rollback_button = QPushButton("Roll &back to the selected version…")
        self.rollback_button.clicked.connect(self._rollback)
        g.addWidget(self.rollback_button, 2, 0)

        cmp_box = QGroupBox("Compare two versions")
        c = QGridLayout(cmp_box)
        self.version_a = QComboBox()
        self.version_b = QComboBox()
        self.compare_button = QPushButton("Co&mpare")
        self.compare_button.clicked.connect(self._compare)
        c.addWidget(QLabel("A:"), 0, 0)
        c.addWidget(self.version_a, 0, 1)
        c.addWidget(QLabel("B:"), 0, 2)
        c.addWidget(self.version_b, 0, 3)
        c.addWidget(self.compare_button, 0, 4)
        self.comparison = make_table()
        self.comparison.setObjectName("comparison")
        c.addWidget(self.comparison, 1, 0, 1, 5)
        self.distance = QLabel()
        self.distance.setObjectName("distance")
        self.distance.setWordWrap(True)
        c.addWidget(self.distance, 2, 0, 1, 5)

        personal = QGroupBox("Your personal versions (on this device)")
        p = QVBoxLayout(personal)
        self.personal = make_table()
        self.personal.setObjectName("personal_versions")
        p.addWidget(self.personal)
        self.restore_button = QPushButton("R&estore the selected personal version…")
        self.restore_button.clicked.connect(self._restore)
        p.addWidget(self.restore_button)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(glob, 3)
        lv.addWidget(cmp_box, 2)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(personal)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setSizes([540, 480])
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addWidget(split, 1)
        tab_chain(
            [
                self.model,
                self.refresh_button,
                self.table,
                self.rollback_button,
                self.version_a,
                self.version_b,
                self.compare_button,
                self.comparison,
                self.personal,
                self.restore_button,
            ]
        )

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        guarded(self.bar, self._load)

    def _load(self) -> None:
        models = reload_models(self.model, self.bar, self.session.models)
        if not models:
            self.head.setText("no models yet")
            fill_table(self.table, ("version",), [])
        self._load_versions()
        self._load_personal()

    def _load_versions(self) -> None:
        model = self.model.currentData()
        if not model:
            return
        versions = guarded(self.bar, lambda: self.session.versions(model))
        if versions is None:
            return
        self._versions = sorted(versions, key=lambda v: -v.version)
        head = max((v.version for v in versions), default=0)
        infos = guarded(self.bar, self.session.models) or []
        for m in infos:
            if m.name == model:
                head = m.current_version
        self.head.setText(f"head: v{head}")
        self._head = head
        rows = []
        for v in self._versions:
            acc = v.metrics.get("accuracy")
            origin = (
                f"rollback to v{v.rollback_of}"
                if v.rollback_of
                else f"round {v.round_number}"
                if v.round_number
                else v.created_by
            )
            rows.append(
                (
                    v.version,
                    "● head" if v.version == head else "",
                    when(v.created_unix_ms),
                    origin,
                    "-" if acc is None else float(acc),
                    ", ".join(v.tags),
                    v.description,
                )
            )
        fill_table(
            self.table,
            ("version", "", "created (UTC)", "from", "accuracy", "tags", "description"),
            rows,
        )
        for combo, pick in ((self.version_a, 1), (self.version_b, 0)):
            combo.clear()
            for v in self._versions:
                combo.addItem(f"v{v.version}", v.version)
            combo.setCurrentIndex(min(pick, combo.count() - 1))
        if len(self._versions) >= 2:
            self._compare()  # the newest change at a glance; the user picks others

    def _load_personal(self) -> None:
        versions = guarded(self.bar, self.session.trainer.versions)
        if versions is None:
            return
        rows = [
            (
                v["version"],
                "● active" if v["active"] else "",
                when(v["created_at"] * 1000),
                float(v["metrics"].get("accuracy", 0.0)),
                int(v["metrics"].get("examples_used", 0)),
                v["body"],
            )
            for v in sorted(versions, key=lambda v: -v["version"])
        ]
        fill_table(
            self.personal,
            ("version", "", "created (UTC)", "val. accuracy", "examples", "body"),
            rows,
        )

    def _selected(self, table: Any) -> int | None:
        rows = table.selectionModel().selectedRows()
        if not rows:
            return None
        item = table.item(rows[0].row(), 0)
        return int(item.text()) if item is not None else None

    # ------------------------------------------------------------------ actions
    def _rollback(self) -> None:
        model = self.model.currentData()
        target = self._selected(self.table)
        if not model or target is None:
            self.bar.error("Select the version to roll back to in the table first.")
            return
        new = max(v.version for v in self._versions) + 1
        text = (
            f"Model {model}: version {new} will become the head, with the weights of version "
            f"{target} (the head is now version {self._head}). No version is deleted. A "
            "running server trains from the new head from its next round; a round in flight "
            "fails as superseded."
        )
        if not self.confirm("Roll back?", text):
            return
        user = os.environ.get("USER", "") or self.session.user_id
        req = pb.RollbackRequest(
            model_name=model,
            target_version=target,
            reason=f"rolled back from the desktop app by {self.session.user_id}",
            operator=f"ui:{user}",
        )
        resp = guarded(self.bar, lambda: self.session.admin("Rollback", req))
        if resp is not None:
            self.refresh()
            self.bar.info(f"Version {resp.version} is the new head, with the weights of v{target}.")

    def _compare(self) -> None:
        model = self.model.currentData()
        a, b = self.version_a.currentData(), self.version_b.currentData()
        if not model or a is None or b is None:
            self.bar.error("This model has no versions to compare.")
            return
        req = pb.CompareVersionsRequest(model_name=model, version_a=a, version_b=b)
        resp = guarded(self.bar, lambda: self.session.admin("CompareVersions", req))
        if resp is None:
            return
        rows = []
        for key, ch in sorted(resp.metric_changes.items()):
            pct = f"{ch.change_percent:+.2f}%" if ch.HasField("change_percent") else "-"
            rows.append((key, float(ch.v1), float(ch.v2), f"{ch.change:+.4g}", pct))
        fill_table(self.comparison, ("metric", f"v{a}", f"v{b}", "change", "change %"), rows)
        only = ""
        if resp.only_in_a or resp.only_in_b:
            only = (
                f" Metrics only in v{a}: {', '.join(resp.only_in_a) or 'none'}; only in v{b}: "
                f"{', '.join(resp.only_in_b) or 'none'}."
            )
        self.distance.setText(
            f"Weights v{a} → v{b}: L2 distance {resp.l2_distance:.4g}, cosine similarity "
            f"{resp.cosine_similarity:.6f}.{only}"
        )

    def _restore(self) -> None:
        version = self._selected(self.personal)
        if version is None:
            self.bar.error("Select one of your personal versions first.")
            return
        text = (
            f"Your personal version {version} will become the active model on this device; "
            "the other versions are kept, and you can switch back at any time."
        )
        if not self.confirm("Restore this version?", text):
            return
        if guarded(self.bar, lambda: self.session.trainer.rollback(version) or True):
            self._load_personal()
            self.bar.info(f"Personal version {version} is active.")
