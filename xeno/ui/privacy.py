"""The Privacy tab: consent to federated learning, the device's DP limits, ledgers, GDPR.

The epsilon consequences are computed by the project's accountants
(`common.privacy`); consent is recorded (appended, never overwritten) in the
user's store; export and deletion are `xeno.model_finetuning`'s, deletion
only after the user types their id.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from client.assistant import consent
from common.pb import admin_pb2 as pb
from xeno.ui.backend import Session
from xeno.ui.versions import Confirm, ask
from xeno.ui.widgets import MessageBar, fill_table, guarded, make_table, reload_models, tab_chain

if TYPE_CHECKING:
    from client.assistant.dp_limits import DpLimits

DELTA = 1e-5
SLIDER_STEPS = 10  # the slider moves epsilon in tenths
MAX_ROUNDS = 100_000


def rounds_within(epsilon: float, noise: float, delta: float = DELTA) -> int:
    """How many rounds at this user-level noise stay within epsilon (RDP accountant)."""
    from common.privacy import gaussian_epsilon

    if gaussian_epsilon(noise, 1.0, 1, delta) > epsilon:
        return 0
    lo, hi = 1, MAX_ROUNDS
    if gaussian_epsilon(noise, 1.0, hi, delta) <= epsilon:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if gaussian_epsilon(noise, 1.0, mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


class PrivacyTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        self.confirm: Confirm = ask(self)
        self._loading = False
        self._saved: DpLimits | None = None

        fl = QGroupBox("Federated learning")
        fv = QVBoxLayout(fl)
        self.federated = QCheckBox("&Take part in federated learning")
        self.federated.setObjectName("federated")
        self.federated.toggled.connect(self._set_consent)
        fv.addWidget(self.federated)
        why = QLabel(
            "Your device trains the shared intent model on your examples; only noised, "
            "securely aggregated model updates leave it, never your text."
        )
        why.setWordWrap(True)
        fv.addWidget(why)
        self.consents = make_table()
        self.consents.setObjectName("consents")
        fv.addWidget(QLabel("Consent record (every grant and withdrawal, oldest first)"))
        fv.addWidget(self.consents)

        dp = QGroupBox("Differential privacy this device enforces")
        form = QFormLayout(dp)
        self.min_noise = QDoubleSpinBox()
        self.min_noise.setObjectName("min_noise")
        self.min_noise.setRange(0.0, 20.0)
        self.min_noise.setSingleStep(0.1)
        self.min_noise.setValue(float(os.environ.get("XENO_MIN_NOISE_MULTIPLIER") or 0.0))
        form.addRow("Minimum noise multiplier:", self.min_noise)
        row = QHBoxLayout()
        self.budget = QSlider(Qt.Orientation.Horizontal)
        self.budget.setObjectName("budget")
        self.budget.setRange(1, 20 * SLIDER_STEPS)
        eps = float(os.environ.get("XENO_MAX_USER_EPSILON") or 8.0)
        self.budget.setValue(round(eps * SLIDER_STEPS))
        self.budget_label = QLabel()
        row.addWidget(self.budget, 1)
        row.addWidget(self.budget_label)
        form.addRow("Epsilon budget per model:", row)
        self.consequence = QLabel()
        self.consequence.setObjectName("consequence")
        self.consequence.setWordWrap(True)
        # A wrapped label in a form gets one line's height unless told: it holds ~4 lines.
        self.consequence.setMinimumHeight(self.consequence.fontMetrics().lineSpacing() * 5)
        form.addRow(self.consequence)
        self.save_limits = QPushButton("&Save for this device")
        self.save_limits.setObjectName("save_limits")
        self.save_limits.clicked.connect(self.save_dp_limits)
        form.addRow(self.save_limits)
        self.device_flags = QLineEdit()
        self.device_flags.setReadOnly(True)
        form.addRow("Start the device with:", self.device_flags)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.update_consequence)
        self.budget.valueChanged.connect(lambda _v: self._budget_moved())
        self.min_noise.valueChanged.connect(lambda _v: self._budget_moved())

        report = QGroupBox("Privacy report")
        rg = QGridLayout(report)
        self.device_note = QLabel("This device's ledger (what its data has spent)")
        self.device_note.setWordWrap(True)
        rg.addWidget(self.device_note, 0, 0, 1, 2)
        self.device_ledger = make_table()
        self.device_ledger.setObjectName("device_ledger")
        rg.addWidget(self.device_ledger, 1, 0, 1, 2)
        rg.addWidget(QLabel("Global model:"), 2, 0)
        self.model = QComboBox()
        self.model.currentIndexChanged.connect(lambda _i: self._load_report())
        rg.addWidget(self.model, 2, 1)
        self.global_ledger = make_table()
        self.global_ledger.setObjectName("global_ledger")
        rg.addWidget(self.global_ledger, 3, 0, 1, 2)
        self.global_summary = QLabel()
        self.global_summary.setObjectName("global_summary")
        self.global_summary.setWordWrap(True)
        rg.addWidget(self.global_summary, 4, 0, 1, 2)

        gdpr = QGroupBox("Your data (GDPR)")
        gg = QGridLayout(gdpr)
        self.export_button = QPushButton("E&xport all my data…")
        self.export_button.clicked.connect(self._choose_export)
        gg.addWidget(self.export_button, 0, 0, 1, 2)
        gg.addWidget(
            QLabel(f"To delete everything kept for you on this device, type {session.user_id}:"),
            1,
            0,
            1,
            2,
        )
        self.confirm_text = QLineEdit()
        self.confirm_text.setObjectName("confirm_delete")
        self.confirm_text.setPlaceholderText(session.user_id)
        self.confirm_text.textChanged.connect(self._typed)
        gg.addWidget(self.confirm_text, 2, 0)
        self.delete_button = QPushButton("&Delete my data")
        self.delete_button.setEnabled(False)
        self.delete_button.clicked.connect(self._delete)
        gg.addWidget(self.delete_button, 2, 1)
        self.forget_server = QCheckBox("also ask the server to erase this device's records")
        self.forget_server.setVisible(session.server is not None)
        gg.addWidget(self.forget_server, 3, 0, 1, 2)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(fl, 1)
        lv.addWidget(dp)
        lv.addWidget(gdpr)
        self.consents.setMinimumHeight(80)
        self.consents.setMaximumHeight(160)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(report)
        split.setSizes([540, 480])
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addWidget(split, 1)
        tab_chain(
            [
                self.federated,
                self.consents,
                self.min_noise,
                self.budget,
                self.save_limits,
                self.device_flags,
                self.export_button,
                self.confirm_text,
                self.delete_button,
                self.forget_server,
                self.device_ledger,
                self.model,
                self.global_ledger,
            ]
        )

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        guarded(self.bar, self._load)

    def _load(self) -> None:
        from client.assistant.dp_limits import load_dp_limits

        store = self.session.store
        saved = load_dp_limits(store)
        self._saved = saved
        if saved is not None:
            self.min_noise.setValue(saved.min_noise_multiplier)
            if saved.max_user_epsilon > 0:
                self.budget.setValue(round(saved.max_user_epsilon * SLIDER_STEPS))
        elif not os.environ.get("XENO_MIN_NOISE_MULTIPLIER") and self.min_noise.value() == 0.0:
            # The constant, not client.runtime's config: importing the runtime costs about 1 s,
            # which the first visit of this tab would spend.
            from client.protection import DEFAULT_MIN_NOISE_MULTIPLIER

            self.min_noise.setValue(DEFAULT_MIN_NOISE_MULTIPLIER)
        self._loading = True
        try:
            self.federated.setChecked(consent.given(store, consent.Scope.FEDERATED_TRAINING))
        finally:
            self._loading = False
        fill_table(
            self.consents,
            ("scope", "granted", "time (UTC)"),
            [
                (c["scope"], "yes" if c["granted"] else "withdrawn", _time(c["timestamp"]))
                for c in consent.consent_history(store)
            ],
        )
        self._load_device_ledger()
        reload_models(self.model, self.bar, self.session.models)
        self._load_report()
        self.update_consequence()

    def _load_device_ledger(self) -> None:
        from xeno.model_finetuning import _device_state_dir, _privacy_ledger

        entries = guarded(
            self.bar,
            lambda: _privacy_ledger(_device_state_dir(self.session.home)),
            "The device's ledger is sealed with the device key (XENO_DEVICE_KEY_FILE).",
        )
        fill_table(
            self.device_ledger,
            ("model", "level", "mechanism", "noise z", "steps", "epsilon", "delta"),
            [
                (
                    e["model"],
                    e["level"],
                    e["mechanism"],
                    float(e["noise_multiplier"]),
                    int(e["steps"]),
                    float(e["epsilon"]),
                    f"{e['delta']:g}",
                )
                for e in entries or []
            ],
        )
        self.device_note.setText(
            "This device's ledger (what its data has spent)"
            + ("" if entries else ": empty, this device has not trained under DP yet")
        )

    def _load_report(self) -> None:
        model = self.model.currentData()
        if not model:
            self.global_summary.setText("No federated model yet.")
            return
        req = pb.GetPrivacyReportRequest(model_name=model)
        report: Any = guarded(self.bar, lambda: self.session.admin("GetPrivacyReport", req))
        if report is None:
            return
        fill_table(
            self.global_ledger,
            ("round", "level", "mechanism", "noise z", "clip", "cohort", "epsilon"),
            [
                (
                    int(e.round_number),
                    e.level,
                    e.mechanism,
                    float(e.noise_multiplier),
                    float(e.clip_norm),
                    int(e.cohort),
                    float(e.epsilon),
                )
                for e in report.entries
            ],
        )
        if report.entries:
            budget = f" of a budget of {report.budget:g}" if report.budget > 0 else ""
            self.global_summary.setText(
                f"User-level privacy of {model}: epsilon {report.epsilon:.3f}{budget} at delta "
                f"{report.delta:g}: {report.status} (strong ≤ 1, moderate ≤ 8, weak above)."
            )
        else:
            self.global_summary.setText(
                f"{model} has had no user-level differentially private round: the global "
                "model carries no user-level guarantee."
            )

    # ------------------------------------------------------------------ DP settings
    def epsilon(self) -> float:
        return self.budget.value() / SLIDER_STEPS

    def _budget_moved(self) -> None:
        self.budget_label.setText(f"ε = {self.epsilon():.1f}")
        self._debounce.start()

    def update_consequence(self) -> None:
        from common.privacy import noise_for_epsilon, privacy_status

        eps, z = self.epsilon(), self.min_noise.value()
        self.budget_label.setText(f"ε = {eps:.1f}")
        parts = [f"A budget of ε = {eps:.1f} at δ = {DELTA:g} is {privacy_status(eps)}."]
        if z > 0:
            n = guarded(self.bar, lambda: rounds_within(eps, z))
            if n == 0:
                parts.append(
                    f"At noise multiplier {z:g}, one round already spends more than this: the "
                    "device would decline every task. Raise the noise or the budget."
                )
            elif n is not None:
                parts.append(
                    f"At noise multiplier {z:g}, this device takes part in at most "
                    f"{n if n < MAX_ROUNDS else f'{MAX_ROUNDS:,}+'} rounds of a model, then "
                    "declines its tasks."
                )
        else:
            parts.append(
                "Without a minimum noise, any verified noise is accepted until the budget."
            )
        z100 = guarded(self.bar, lambda: noise_for_epsilon(eps, 1.0, 100, DELTA))
        if z100 is not None:
            parts.append(f"100 rounds within it need a noise multiplier of at least {z100:.2f}.")
        parts.append(
            "(RDP accountant of the Gaussian mechanism, one participation per round; the "
            "device's ledger accounts its Skellam noise exactly, which this approaches.)"
        )
        self.consequence.setText(" ".join(parts))
        saved = self._saved
        if saved is not None and (saved.min_noise_multiplier, saved.max_user_epsilon) == (z, eps):
            self.device_flags.setText(
                f"xeno-fl client --user {self.session.user_id} … (these limits are saved)"
            )
        else:
            self.device_flags.setText(
                f"xeno-fl client --min-noise-multiplier {z:g} --max-user-epsilon {eps:g} …"
            )

    def save_dp_limits(self) -> None:
        """Keep the chosen limits in the user's store: `xeno-fl client --user` enforces them."""
        from client.assistant.dp_limits import DpLimits, save_dp_limits

        def save() -> DpLimits:
            limits = DpLimits(float(self.min_noise.value()), self.epsilon())
            save_dp_limits(self.session.store, limits)
            return limits

        limits = guarded(self.bar, save)
        if limits is None:
            return
        self._saved = limits
        self.update_consequence()
        self.bar.info(
            f"Saved for this device: minimum noise multiplier {limits.min_noise_multiplier:g}, "
            f"epsilon budget {limits.max_user_epsilon:g} per model. xeno-fl client --user "
            f"{self.session.user_id} enforces them unless its flags say otherwise."
        )

    # ------------------------------------------------------------------ consent
    def _set_consent(self, on: bool) -> None:
        if self._loading:
            return
        store = self.session.store

        def record() -> bool:
            consent.record(store, consent.Scope.FEDERATED_TRAINING, on)
            return True

        done = guarded(self.bar, record)
        if done:
            self.refresh()
            self.bar.info(
                "Federated learning is on: your device may train the shared model."
                if on
                else "Federated learning is off: your examples are no longer used for it."
            )

    # ------------------------------------------------------------------ GDPR
    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export all my data",
            str(Path.home() / f"{self.session.user_id}-export.json"),
            "JSON (*.json)",
        )
        if path:
            self.export_to(Path(path))

    def export_to(self, path: Path) -> None:
        from xeno.model_finetuning import export_user_data

        archive = guarded(
            self.bar,
            lambda: export_user_data(self.session.user_id, path=path, home=self.session.home),
            "Choose a folder you can write to.",
        )
        if archive is not None:
            store = archive["store"]
            counts = ", ".join(
                f"{len(v)} {k.replace('_', ' ')}"
                for k, v in store.items()
                if isinstance(v, list) and v
            )
            self.bar.info(f"Exported to {path} (readable only by you): {counts or 'no records'}.")

    def _typed(self, text: str) -> None:
        self.delete_button.setEnabled(text == self.session.user_id and not self.session.deleted)

    def _delete(self) -> None:
        from xeno.model_finetuning import delete_user_data

        user = self.session.user_id
        if self.confirm_text.text() != user:
            return
        server = self.session.server if self.forget_server.isChecked() else None
        text = (
            f"Everything kept for {user} on this device (preferences, interactions, memory, "
            "examples, personal models, consent record) is destroyed: its key is shredded "
            "first, so no copy can be read again. This cannot be undone."
        )
        if not self.confirm("Delete all your data?", text):
            return
        self.session.forget_device_store()
        result = guarded(
            self.bar,
            lambda: delete_user_data(user, home=self.session.home, server=server),
        )
        self.confirm_text.clear()
        self.delete_button.setEnabled(False)
        if result is None:
            return
        if "error" in result.get("server", {}):
            self.bar.error(
                f"Deleted on this device; the server did not erase: {result['server']['error']}",
                "Try again later with xeno-fl user delete --server.",
            )
        else:
            self.bar.info(
                f"All data of {user} was deleted from this device"
                + (" and the server." if server else ".")
            )
