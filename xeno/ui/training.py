"""The Training tab: the model to personalize, examples imported from a file, training, result.

Training runs in a child process (`xeno.ui.train_job`) driven by a worker
thread: the window never waits for it, the progress bar and log follow its
lines, and Cancel kills it (the new version is stored in one transaction at
the end, so a cancelled run changes nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QThread, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from xeno.ui.backend import Session
from xeno.ui.importer import Parsed, parse_examples
from xeno.ui.widgets import MessageBar, fill_table, guarded, make_table, tab_chain

if TYPE_CHECKING:
    from client.assistant.intents import MiniBatch

CUSTOM = "custom"
AUTOMATIC = "lbfgs"


class TrainWorker(QThread):
    """Runs the training job and relays its lines; cancel() kills it."""

    progress = Signal(int, bool)
    log = Signal(str)
    succeeded = Signal(dict)
    failed = Signal(str)

    def __init__(self, command: list[str]) -> None:
        super().__init__()
        self.command = command
        self._proc: subprocess.Popen[str] | None = None
        self.cancelled = False

    def run(self) -> None:
        try:
            self._proc = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError as exc:
            self.failed.emit(f"could not start the training process: {exc}")
            return
        result: dict[str, Any] | None = None
        error = ""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "log" in msg:
                self.log.emit(str(msg["log"]))
            if "progress" in msg:
                self.progress.emit(int(msg["progress"]), bool(msg.get("busy", False)))
            if "error" in msg:
                error = str(msg["error"])
            elif "result" in msg:
                result = msg["result"]
        self._proc.wait()
        if self.cancelled:
            self.failed.emit("cancelled: nothing was stored")
        elif result is not None and not error:
            self.succeeded.emit(result)
        else:
            self.failed.emit(
                error or f"the training process ended with code {self._proc.returncode}"
            )

    def cancel(self) -> None:
        self.cancelled = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


class TrainingTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        self.worker: TrainWorker | None = None
        self.parsed: Parsed | None = None

        model_box = QGroupBox("Model")
        form = QFormLayout(model_box)
        self.model = QComboBox()
        self.model.setObjectName("model")
        form.addRow("Personalize:", self.model)
        self.optimizer = QComboBox()
        self.optimizer.setObjectName("optimizer")
        self.optimizer.addItem("automatic (L-BFGS)", AUTOMATIC)
        self.optimizer.addItem("Adam (mini-batch)", "adam")
        self.optimizer.addItem("SGD (mini-batch)", "sgd")
        self.optimizer.currentIndexChanged.connect(self._optimizer_changed)
        form.addRow("Optimizer:", self.optimizer)
        # The ranges let 0 through on purpose: MiniBatch refuses it with a message that says
        # which value is wrong, instead of a spin box that silently clamps.
        self.learning_rate = QDoubleSpinBox()
        self.learning_rate.setObjectName("learning_rate")
        self.learning_rate.setDecimals(6)
        self.learning_rate.setRange(0.0, 10.0)
        self.learning_rate.setSingleStep(0.001)
        self.learning_rate.setValue(0.01)
        self.epochs = QSpinBox()
        self.epochs.setObjectName("epochs")
        self.epochs.setRange(0, 10_000)
        self.epochs.setValue(50)
        self.batch = QSpinBox()
        self.batch.setObjectName("batch_size")
        self.batch.setRange(0, 1_000_000)
        self.batch.setValue(32)
        form.addRow("Learning rate:", self.learning_rate)
        form.addRow("Epochs:", self.epochs)
        form.addRow("Batch size:", self.batch)
        note = QLabel(
            "Automatic fits the personal model's head to convergence on all your examples "
            "(L-BFGS, full batch); Adam or SGD run exactly the learning rate, epochs and batch "
            "size you set, from the previous version's head. Either way the head is "
            "calibrated on 20% held out. A federated model lends its text body; the local "
            "update of federated rounds follows the server's task."
        )
        note.setWordWrap(True)
        form.addRow(note)
        self._optimizer_changed()

        data_box = QGroupBox("Training examples (CSV or JSONL: input_text, intent[, rating])")
        grid = QGridLayout(data_box)
        self.import_button = QPushButton("&Import file…")
        self.import_button.clicked.connect(self._choose_file)
        self.file_label = QLabel("no file chosen")
        self.add_button = QPushButton("&Add valid rows")
        self.add_button.setEnabled(False)
        self.add_button.clicked.connect(self._add_rows)
        self.preview = make_table()
        self.preview.setObjectName("import_preview")
        self.errors = make_table()
        self.errors.setObjectName("import_errors")
        self.store_label = QLabel()
        self.store_label.setWordWrap(True)
        grid.addWidget(self.import_button, 0, 0)
        grid.addWidget(self.file_label, 0, 1)
        grid.addWidget(self.add_button, 0, 2)
        grid.addWidget(QLabel("Preview"), 1, 0)
        grid.addWidget(self.preview, 2, 0, 1, 3)
        grid.addWidget(QLabel("Rows with errors (not added)"), 3, 0, 1, 3)
        grid.addWidget(self.errors, 4, 0, 1, 3)
        grid.addWidget(self.store_label, 5, 0, 1, 3)
        grid.setRowStretch(2, 2)
        grid.setRowStretch(4, 1)

        run_box = QGroupBox("Train")
        rv = QVBoxLayout(run_box)
        buttons = QHBoxLayout()
        self.train_button = QPushButton("&Train")
        self.train_button.clicked.connect(self.start_training)
        self.cancel_button = QPushButton("&Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_running)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        rv.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setObjectName("progress")
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        rv.addWidget(self.progress)
        self.log = QPlainTextEdit()
        self.log.setObjectName("log")
        self.log.setReadOnly(True)
        rv.addWidget(self.log, 1)
        rv.addWidget(QLabel("Result, next to the previous version"))
        self.result = make_table()
        self.result.setObjectName("result")
        rv.addWidget(self.result, 1)

        left = QVBoxLayout()
        left.addWidget(model_box)
        left.addWidget(data_box, 1)
        body = QHBoxLayout()
        body.addLayout(left, 3)
        body.addWidget(run_box, 2)
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addLayout(body, 1)
        order: list[QWidget] = [
            self.model,
            self.optimizer,
            self.learning_rate,
            self.epochs,
            self.batch,
            self.import_button,
            self.add_button,
            self.preview,
            self.errors,
            self.train_button,
            self.cancel_button,
            self.log,
            self.result,
        ]
        tab_chain(order)

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        guarded(self.bar, self._load)

    def _load(self) -> None:
        current = self.model.currentData()
        self.model.clear()
        self.model.addItem("custom: your examples only (local)", CUSTOM)
        models = guarded(self.bar, self.session.models) or []
        for m in models:
            if m.spec.architecture == "fasttext":
                # Over a server the weights are not downloadable by the admin API: the body
                # is the one this device saved from its last round (or the shipped one).
                where = "" if self.session.db_url else " (as this device last received it)"
                self.model.addItem(
                    f"{m.name} v{m.current_version}: the federated intent body{where}", m.name
                )
        self.model.setCurrentIndex(max(0, self.model.findData(current)))
        self._show_store()

    def _show_store(self) -> None:
        examples = self.session.trainer.labelled_examples()
        intents = len({i for _, i in examples})
        self.store_label.setText(
            f"Your store holds {len(examples)} labelled examples of {intents} intents "
            "(training needs at least 50, of 2 intents or more)."
        )

    # ------------------------------------------------------------------ import
    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Import training examples", "", "Examples (*.csv *.jsonl *.json *.ndjson)"
        )
        if path:
            self.load_file(Path(path))

    def load_file(self, path: Path) -> None:
        """Parse a file into the preview and the per-row errors (nothing is stored yet)."""
        self.bar.clear()
        parsed = guarded(
            self.bar,
            lambda: parse_examples(path, self.session.store.limits.max_text_chars),
            "Choose a UTF-8 .csv (with a header line) or .jsonl file.",
        )
        self.parsed = parsed
        self.file_label.setText(path.name)
        rows = parsed.rows if parsed else []
        fill_table(
            self.preview,
            ("line", "input_text", "intent", "rating"),
            [(r.line, r.input_text, r.intent, r.rating or "") for r in rows],
        )
        errors = parsed.errors if parsed else []
        fill_table(self.errors, ("line", "error"), errors)
        self.add_button.setEnabled(bool(rows))
        self.add_button.setText(f"&Add {len(rows)} valid rows")
        if parsed and errors:
            self.bar.error(
                f"{len(errors)} of {len(rows) + len(errors)} rows of {path.name} have errors.",
                "Fix them in the file and import it again, or add the valid rows only.",
            )

    def _add_rows(self) -> None:
        if self.parsed is None:
            return
        trainer = self.session.trainer
        added = 0
        refused: list[tuple[int, str]] = []
        for r in self.parsed.rows:
            try:
                trainer.add_training_example(
                    r.input_text, r.output_text, {"intent": r.intent}, r.rating
                )
                added += 1
            except ValueError as exc:
                refused.append((r.line, str(exc)))
        fill_table(self.errors, ("line", "error"), self.parsed.errors + refused)
        self.parsed = None
        self.add_button.setEnabled(False)
        self.bar.info(f"Added {added} examples." + (f" {len(refused)} refused." if refused else ""))
        guarded(self.bar, self._show_store)

    # ------------------------------------------------------------------ training
    def _optimizer_changed(self) -> None:
        chosen = self.optimizer.currentData() != AUTOMATIC
        for w in (self.learning_rate, self.epochs, self.batch):
            w.setEnabled(chosen)

    def optimization(self) -> MiniBatch | None:
        """The chosen setting, None for automatic; ValueError names a bad value."""
        kind = self.optimizer.currentData()
        if kind == AUTOMATIC:
            return None
        # Imported here: torch comes with it, and the window opens before it is needed.
        from client.assistant.intents import MiniBatch

        return MiniBatch(
            learning_rate=float(self.learning_rate.value()),
            epochs=int(self.epochs.value()),
            batch_size=int(self.batch.value()),
            optimizer=str(kind),
        )

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "xeno.ui.train_job",
            "--user",
            self.session.user_id,
            "--home",
            str(self.session.home),
        ]
        model = self.model.currentData()
        if model and model != CUSTOM:
            if self.session.db_url:
                cmd += ["--db", self.session.db_url, "--model", str(model)]
            else:
                cmd += ["--device-body"]
        setting = self.optimization()
        if setting is not None:
            cmd += [
                "--optimizer",
                setting.optimizer,
                "--learning-rate",
                repr(setting.learning_rate),
                "--epochs",
                str(setting.epochs),
                "--batch-size",
                str(setting.batch_size),
            ]
        return cmd

    def start_training(self) -> None:
        if self.worker is not None:
            return
        self.bar.clear()
        try:
            command = self.command()
        except ValueError as exc:
            self.bar.error(
                f"Training settings: {exc}.",
                "Correct the value, or choose automatic (L-BFGS), then train again.",
            )
            return
        self._previous = self._active_version()
        self.log.clear()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.worker = TrainWorker(command)
        self.worker.progress.connect(self._progress)
        self.worker.log.connect(self.log.appendPlainText)
        self.worker.succeeded.connect(self._succeeded)
        self.worker.failed.connect(self._failed)
        self.worker.finished.connect(self._finished)
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.worker.start()

    def _active_version(self) -> dict[str, Any] | None:
        versions = guarded(self.bar, self.session.trainer.versions) or []
        active = [v for v in versions if v["active"]]
        return active[0] if active else None

    def _progress(self, value: int, busy: bool) -> None:
        if busy:
            self.progress.setRange(0, 0)  # an animated bar: the fit reports no steps
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(value)

    def _succeeded(self, result: dict[str, Any]) -> None:
        self.session.trainer.rollback(int(result["version"]))  # reload the new active head
        prev = self._previous
        pm: dict[str, Any] = prev["metrics"] if prev else {}
        rows = [
            ("version", result["version"], prev["version"] if prev else "-"),
            ("validation accuracy", float(result["accuracy"]), _num(pm.get("accuracy"))),
            ("examples used", int(result["examples_used"]), _num(pm.get("examples_used"))),
            (
                "validation examples",
                int(result["validation_examples"]),
                _num(pm.get("validation_examples")),
            ),
            ("intents", int(result["intents"]), _num(pm.get("intents"))),
            ("body", result.get("body", ""), prev["body"] if prev else "-"),
        ]
        fill_table(self.result, ("", "this run", "previous version"), rows)
        self.bar.info(
            f"Trained personal version {result['version']}: validation accuracy "
            f"{float(result['accuracy']):.1%} on {result['validation_examples']} held-out "
            "examples. It is now active."
        )

    def _failed(self, message: str) -> None:
        hint = ""
        if "at least 50" in message or "at least 2 intents" in message:
            hint = "Import more labelled examples (Import file…), then train again."
        elif not message.startswith("cancelled"):
            hint = "See the training log; fix the cause and train again."
        self.log.appendPlainText(message)
        if message.startswith("cancelled"):
            self.bar.info("Training cancelled: nothing was stored.")
        else:
            self.bar.error(f"Training failed: {message}", hint)

    def _finished(self) -> None:
        self.progress.setRange(0, 100)
        if self.worker is not None and not self.worker.cancelled and self.bar.kind != "error":
            self.progress.setValue(100)
        else:
            self.progress.setValue(0)
        self.worker = None
        self.train_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        guarded(self.bar, self._show_store)

    def cancel_running(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.cancel()
            worker.wait(10_000)


def _num(value: Any) -> Any:
    return "-" if value is None else value
