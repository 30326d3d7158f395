"""The Personalization tab: explicit choices, learning switches, expertise, the prompt preview."""

from __future__ import annotations

import itertools

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from client.assistant.personalization import ALLOWED, EXPERTISE, EXPERTISE_PREFIX, Dimension
from xeno.ui.backend import Session
from xeno.ui.widgets import MessageBar, fill_table, guarded, make_table

AUTO = "(learned or default)"
LABELS: dict[str, str] = {
    Dimension.STYLE: "Communication style",
    Dimension.DETAIL: "Detail level",
    Dimension.FORMAT: "Response format",
    Dimension.TONE: "Tone",
}


def _pretty(value: str) -> str:
    return value.replace("_", " ").capitalize()


class PersonalizationTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        self._loading = False

        choices = QGroupBox("Your choices (an explicit choice always wins over what is learned)")
        form = QFormLayout(choices)
        self.selectors: dict[str, QComboBox] = {}
        self.learning: dict[str, QCheckBox] = {}
        dims: tuple[str, ...] = (
            Dimension.STYLE,
            Dimension.DETAIL,
            Dimension.FORMAT,
            Dimension.TONE,
        )
        for dim in dims:
            combo = QComboBox()
            combo.setObjectName(f"pref_{dim}")
            combo.addItem(AUTO, "")
            for value in ALLOWED[dim]:
                combo.addItem(_pretty(value), value)
            combo.currentIndexChanged.connect(lambda _i, d=dim: self._choose(d))
            toggle = QCheckBox("learn from my ratings")
            toggle.setObjectName(f"learn_{dim}")
            toggle.toggled.connect(lambda on, d=dim: self._set_learning(d, on))
            row = QHBoxLayout()
            row.addWidget(combo, 1)
            row.addWidget(toggle)
            form.addRow(LABELS[dim] + ":", row)
            self.selectors[dim] = combo
            self.learning[dim] = toggle
        self.learn_expertise = QCheckBox("learn my expertise from my questions")
        self.learn_expertise.toggled.connect(lambda on: self._set_learning("expertise", on))
        form.addRow("Expertise:", self.learn_expertise)

        in_force = QGroupBox("In force: explicit, learned (with confidence) or default")
        self.in_force = make_table()
        self.in_force.setObjectName("in_force")
        QVBoxLayout(in_force).addWidget(self.in_force)

        expertise = QGroupBox("Expertise per topic")
        grid = QGridLayout(expertise)
        self.topics = make_table()
        self.topics.setObjectName("topics")
        self.topics.itemSelectionChanged.connect(self._topic_selected)
        self.topic_edit = QLineEdit()
        self.topic_edit.setPlaceholderText("topic, e.g. python")
        self.level = QComboBox()
        for level in EXPERTISE:
            self.level.addItem(_pretty(level), level)
        self.set_topic = QPushButton("Set level")
        self.set_topic.clicked.connect(self._set_topic)
        self.remove_topic = QPushButton("Remove")
        self.remove_topic.clicked.connect(self._remove_topic)
        grid.addWidget(self.topics, 0, 0, 1, 4)
        grid.addWidget(self.topic_edit, 1, 0)
        grid.addWidget(self.level, 1, 1)
        grid.addWidget(self.set_topic, 1, 2)
        grid.addWidget(self.remove_topic, 1, 3)

        preview = QGroupBox("Preview: the prompt prefix the assistant will use")
        pv = QVBoxLayout(preview)
        row = QHBoxLayout()
        row.addWidget(QLabel("for topic:"))
        self.preview_topic = QComboBox()
        self.preview_topic.setObjectName("preview_topic")
        self.preview_topic.currentIndexChanged.connect(lambda _i: self.refresh_preview())
        row.addWidget(self.preview_topic, 1)
        pv.addLayout(row)
        self.preview = QPlainTextEdit()
        self.preview.setObjectName("preview")
        self.preview.setReadOnly(True)
        pv.addWidget(self.preview)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(choices)
        lv.addWidget(expertise, 1)
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(in_force, 1)
        rv.addWidget(preview, 1)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addWidget(split, 1)

        chain: list[QWidget] = []
        for dim in self.selectors:
            chain += [self.selectors[dim], self.learning[dim]]
        chain += [self.learn_expertise, self.topics, self.topic_edit, self.level]
        chain += [self.set_topic, self.remove_topic, self.in_force, self.preview_topic]
        chain += [self.preview]
        for a, b in itertools.pairwise(chain):
            QWidget.setTabOrder(a, b)

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        guarded(self.bar, self._load)

    def _load(self) -> None:
        engine = self.session.engine
        explicit = engine.explicit_preferences()
        self._loading = True
        try:
            for dim, combo in self.selectors.items():
                combo.setCurrentIndex(max(0, combo.findData(explicit.get(dim, ""))))
                self.learning[dim].setChecked(engine.learning_enabled(dim))
            self.learn_expertise.setChecked(engine.learning_enabled("expertise"))
            topics = self._topic_names(explicit)
            current = self.preview_topic.currentData()
            self.preview_topic.clear()
            self.preview_topic.addItem("(no topic)", None)
            for t in topics:
                self.preview_topic.addItem(t, t)
            self.preview_topic.setCurrentIndex(max(0, self.preview_topic.findData(current)))
        finally:
            self._loading = False
        rows = []
        for dim in self.selectors:
            p = engine.get_preference(dim)
            rows.append(
                (LABELS[dim], _pretty(p.value), p.source, _confidence(p), round(p.evidence, 2))
            )
        fill_table(self.in_force, ("dimension", "value", "source", "confidence", "evidence"), rows)
        trows = []
        for t in topics:
            p = engine.get_preference(EXPERTISE_PREFIX + t)
            trows.append((t, _pretty(p.value), p.source, _confidence(p)))
        fill_table(self.topics, ("topic", "level", "source", "confidence"), trows)
        self.refresh_preview()

    def _topic_names(self, explicit: dict[str, str]) -> list[str]:
        names = {k[len(EXPERTISE_PREFIX) :] for k in explicit if k.startswith(EXPERTISE_PREFIX)}
        # Topics the assistant has seen in the user's interactions, learned or not yet.
        for (topic,) in self.session.store.query(
            "SELECT DISTINCT json_extract(context, '$.topic') FROM interactions "
            "WHERE json_extract(context, '$.topic') IS NOT NULL"
        ):
            names.add(str(topic))
        return sorted(names)

    def refresh_preview(self) -> None:
        if self._loading:
            return
        topic = self.preview_topic.currentData()
        text = guarded(self.bar, lambda: self.session.engine.get_personalized_prompt_prefix(topic))
        if text is not None:
            self.preview.setPlainText(text)

    # ------------------------------------------------------------------ actions
    def _choose(self, dim: str) -> None:
        if self._loading:
            return
        value = self.selectors[dim].currentData()
        engine = self.session.engine
        if value:
            done = guarded(self.bar, lambda: engine.update_preference(dim, value) or True)
        else:
            done = guarded(self.bar, lambda: engine.clear_preference(dim) or True)
        if done:
            self.bar.clear()
            self.refresh()

    def _set_learning(self, dim: str, on: bool) -> None:
        if self._loading:
            return
        if guarded(self.bar, lambda: self.session.engine.set_learning(dim, on) or True):
            self.refresh()

    def _topic_selected(self) -> None:
        rows = self.topics.selectionModel().selectedRows()
        if not rows:
            return
        r = rows[0].row()
        topic_item, level_item = self.topics.item(r, 0), self.topics.item(r, 1)
        if topic_item is None or level_item is None:
            return
        self.topic_edit.setText(topic_item.text())
        level = level_item.text().lower()
        self.level.setCurrentIndex(max(0, self.level.findData(level)))

    def _set_topic(self) -> None:
        topic = self.topic_edit.text().strip()
        level = self.level.currentData()
        if not topic:
            self.bar.error("Type a topic first.", "e.g. python, cooking, tax law")
            return
        engine = self.session.engine
        if guarded(
            self.bar, lambda: engine.update_preference(EXPERTISE_PREFIX + topic, level) or True
        ):
            self.bar.info(f"Expertise in {topic!r} set to {level}.")
            self.refresh()

    def _remove_topic(self) -> None:
        topic = self.topic_edit.text().strip()
        if not topic:
            self.bar.error("Select a topic in the table first.")
            return
        engine = self.session.engine
        if guarded(self.bar, lambda: engine.clear_preference(EXPERTISE_PREFIX + topic) or True):
            self.bar.info(f"Your explicit level for {topic!r} is removed; the learned one applies.")
            self.refresh()


def _confidence(p: object) -> str:
    source = getattr(p, "source", "")
    if source == "learned":
        return f"{getattr(p, 'confidence', 0.0):.0%}"
    return "-"
