"""The Performance tab: live metrics, trend charts with their verdict, alerts, A/B tests.

Every number comes from the lifecycle (the admin API's GetTrend, ListAlerts and
A/B test calls, and the performance log or round history for the series): the
verdict "improving / degrading / stable" is the Mann-Kendall test the server
runs, shown with its p-value.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from common.pb import admin_pb2 as pb
from xeno.ui.backend import Session
from xeno.ui.chart import LineChart
from xeno.ui.versions import Confirm, ask, when
from xeno.ui.widgets import (
    EXPECTED,
    MessageBar,
    fill_table,
    guarded,
    make_table,
    reload_models,
    tab_chain,
)

REFRESH_MS = 5000
CHART_HEIGHT = 150


def _opt(msg: Any, name: str) -> Any:
    return float(getattr(msg, name)) if msg.HasField(name) else "-"


class PerformanceTab(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.bar = MessageBar()
        self.confirm: Confirm = ask(self)
        self.charts: dict[str, LineChart] = {}
        self.trends: dict[str, Any] = {}

        top = QHBoxLayout()
        top.addWidget(QLabel("Model:"))
        self.model = QComboBox()
        self.model.setObjectName("performance_model")
        self.model.currentIndexChanged.connect(lambda _i: self._load_metrics())
        top.addWidget(self.model, 1)
        self.live = QCheckBox("&Live (every 5 s)")
        self.live.setChecked(True)
        top.addWidget(self.live)
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        top.addWidget(self.refresh_button)
        self.updated = QLabel()
        top.addWidget(self.updated)

        metrics_box = QGroupBox("Metrics")
        mv = QVBoxLayout(metrics_box)
        self.metrics = make_table()
        self.metrics.setObjectName("metrics")
        mv.addWidget(self.metrics)

        charts_box = QGroupBox("Trends (Mann-Kendall at p < 0.05, by each metric's good direction)")
        cv = QVBoxLayout(charts_box)
        self.chart_area = QWidget()
        self.chart_list = QVBoxLayout(self.chart_area)
        self.chart_list.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.chart_area)
        cv.addWidget(scroll)

        alerts_box = QGroupBox("Degradation alerts (newest first)")
        av = QVBoxLayout(alerts_box)
        self.alerts = make_table()
        self.alerts.setObjectName("alerts")
        av.addWidget(self.alerts)

        ab_box = QGroupBox("A/B tests")
        ab = QGridLayout(ab_box)
        self.tests = make_table()
        self.tests.setObjectName("ab_tests")
        self.tests.itemSelectionChanged.connect(self._analyze_selected)
        ab.addWidget(self.tests, 0, 0, 1, 6)
        self.test_name = QLineEdit()
        self.test_name.setPlaceholderText("new test name")
        self.arm_a = QComboBox()
        self.arm_a.setEditable(True)
        self.arm_b = QComboBox()
        self.arm_b.setEditable(True)
        self.split = QDoubleSpinBox()
        self.split.setRange(0.01, 0.99)
        self.split.setSingleStep(0.05)
        self.split.setValue(0.5)
        self.split.setPrefix("A share ")
        self.test_metrics = QLineEdit("accuracy")
        self.create_button = QPushButton("Crea&te")
        self.create_button.clicked.connect(self._create_test)
        for col, w in enumerate(
            (self.test_name, self.arm_a, self.arm_b, self.split, self.test_metrics)
        ):
            ab.addWidget(w, 1, col)
        ab.addWidget(self.create_button, 1, 5)
        self.analysis = make_table()
        self.analysis.setObjectName("ab_analysis")
        ab.addWidget(self.analysis, 2, 0, 1, 6)
        self.ratio = QLabel()
        self.ratio.setWordWrap(True)
        ab.addWidget(self.ratio, 3, 0, 1, 6)
        ab.addWidget(QLabel("Winner:"), 4, 0)
        self.winner = QComboBox()
        self.winner.addItem("significant winner of the first metric", "")
        self.winner.addItem("variant A", "variant_a")
        self.winner.addItem("variant B", "variant_b")
        self.winner.addItem("none (no tag)", "none")
        ab.addWidget(self.winner, 4, 1, 1, 2)
        self.tag = QLineEdit("production")
        ab.addWidget(self.tag, 4, 3)
        self.end_button = QPushButton("&End the selected test…")
        self.end_button.clicked.connect(self._end_test)
        ab.addWidget(self.end_button, 4, 4, 1, 2)

        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(metrics_box)
        left.addWidget(alerts_box)
        left.addWidget(ab_box)
        left.setStretchFactor(0, 3)
        left.setStretchFactor(1, 1)
        left.setStretchFactor(2, 3)
        left.setSizes([260, 110, 330])
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(charts_box)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        outer = QVBoxLayout(self)
        outer.addWidget(self.bar)
        outer.addLayout(top)
        outer.addWidget(split, 1)
        tab_chain(
            [
                self.model,
                self.live,
                self.refresh_button,
                self.metrics,
                self.alerts,
                self.tests,
                self.test_name,
                self.arm_a,
                self.arm_b,
                self.split,
                self.test_metrics,
                self.create_button,
                self.analysis,
                self.winner,
                self.tag,
                self.end_button,
            ]
        )
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        if self.live.isChecked() and self.isVisible():
            self._load_metrics(quiet=True)

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        guarded(self.bar, self._load)

    def _load(self) -> None:
        reload_models(self.model, self.bar, self.session.models)
        self._load_metrics()
        selected = self._selected_test()
        self._load_tests()
        if selected is not None:
            self.select_test(selected)
        elif self.tests.rowCount():
            self.tests.selectRow(0)  # the newest test's analysis, rather than an empty table

    def _load_metrics(self, quiet: bool = False) -> None:
        model = self.model.currentData()
        if not model:
            fill_table(self.metrics, ("metric",), [])
            return
        series = guarded(self.bar, lambda: self.session.metric_series(model))
        if series is None:
            return
        if not quiet:
            self.bar.clear()
        rows = []
        self.trends = {}
        for name in sorted(series):
            values = series[name]
            req = pb.GetTrendRequest(model_name=model, metric=name)
            trend = _quiet(lambda r=req: self.session.admin("GetTrend", r))
            self.trends[name] = trend
            rows.append(
                (
                    name,
                    values[-1],
                    sum(values) / len(values),
                    min(values),
                    max(values),
                    len(values),
                    trend.trend if trend else "-",
                    f"{trend.p_value:.3g}" if trend else "-",
                )
            )
        fill_table(
            self.metrics,
            ("metric", "latest", "mean", "min", "max", "n", "trend", "p-value"),
            rows,
        )
        self._draw_charts(series)
        alerts = guarded(
            self.bar,
            lambda: self.session.admin("ListAlerts", pb.ListAlertsRequest(model_name=model)),
        )
        if alerts is not None:
            fill_table(
                self.alerts,
                ("time (UTC)", "metric", "kind", "value", "baseline", "message"),
                [
                    (when(a.created_unix_ms), a.metric, a.kind, a.value, a.baseline, a.message)
                    for a in alerts.alerts
                ],
            )
        versions = guarded(self.bar, lambda: self.session.versions(model)) or []
        # Default arms: the previous version against the newest.
        for combo, pick in ((self.arm_a, 1), (self.arm_b, 0)):
            text = combo.currentText()
            combo.clear()
            for v in sorted(versions, key=lambda v: -v.version):
                combo.addItem(f"{model}:{v.version}")
            if text:
                combo.setCurrentText(text)
            else:
                combo.setCurrentIndex(min(pick, combo.count() - 1))
        from datetime import datetime

        self.updated.setText(f"updated {datetime.now():%H:%M:%S}")

    def _draw_charts(self, series: dict[str, list[float]]) -> None:
        for name in list(self.charts):
            if name not in series:
                self.charts.pop(name).deleteLater()
        for i, name in enumerate(sorted(series)):
            chart = self.charts.get(name)
            if chart is None:
                chart = LineChart(name)
                chart.setObjectName(f"chart_{name}")
                chart.setFixedHeight(CHART_HEIGHT)
                self.charts[name] = chart
                self.chart_list.insertWidget(i, chart)
            trend = self.trends.get(name)
            if trend is not None:
                chart.set_series(series[name], trend.trend, f"  p = {trend.p_value:.3g}")
            else:
                chart.set_series(series[name])
        # The scroll area does not grow its widget to the layout's minimum by itself (and the
        # layout's cached minimum can be stale here): the charts' own heights decide.
        margins = self.chart_list.contentsMargins()
        self.chart_area.setMinimumHeight(
            sum(c.height() + self.chart_list.spacing() for c in self.charts.values())
            + margins.top()
            + margins.bottom()
        )

    def _load_tests(self) -> None:
        resp = guarded(self.bar, lambda: self.session.admin("ListAbTests", pb.ListAbTestsRequest()))
        if resp is None:
            return
        fill_table(
            self.tests,
            ("test", "status", "variant A", "variant B", "A share", "metrics", "winner"),
            [
                (
                    t.name,
                    t.status,
                    f"{t.variant_a.model_name}:{t.variant_a.version}",
                    f"{t.variant_b.model_name}:{t.variant_b.version}",
                    float(t.traffic_split),
                    ", ".join(t.metrics),
                    t.winner or "-",
                )
                for t in resp.tests
            ],
        )

    def _selected_test(self) -> str | None:
        rows = self.tests.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.tests.item(rows[0].row(), 0)
        return item.text() if item is not None else None

    def select_test(self, name: str) -> None:
        for r in range(self.tests.rowCount()):
            item = self.tests.item(r, 0)
            if item is not None and item.text() == name:
                self.tests.selectRow(r)
                return

    def _analyze_selected(self) -> None:
        name = self._selected_test()
        if name is None:
            return
        req = pb.AnalyzeAbTestRequest(test_name=name)
        resp = guarded(self.bar, lambda: self.session.admin("AnalyzeAbTest", req))
        if resp is None:
            return
        rows = []
        for metric, m in sorted(resp.metrics.items()):
            ci = (
                f"[{m.ci_low:.4g}, {m.ci_high:.4g}]"
                if m.HasField("ci_low") and m.HasField("ci_high")
                else "-"
            )
            rows.append(
                (
                    metric,
                    int(m.count_a),
                    int(m.count_b),
                    _opt(m, "variant_a_mean"),
                    _opt(m, "variant_b_mean"),
                    _opt(m, "difference"),
                    ci,
                    f"{m.p_value:.3g}" if m.HasField("p_value") else "-",
                    m.winner,
                )
            )
        fill_table(
            self.analysis,
            ("metric", "n A", "n B", "mean A", "mean B", "B - A", "95% CI", "p", "winner"),
            rows,
        )
        sr = resp.sample_ratio
        self.ratio.setText(
            f"Test {name} ({resp.test.status}): users per arm {sr.count_a} / {sr.count_b}, "
            f"expected A share {sr.expected_share_a:.2f}, sample-ratio p {sr.p_value:.3g}"
            + (
                " — MISMATCH: check the assignment before trusting the result"
                if sr.mismatch
                else ""
            )
        )

    # ------------------------------------------------------------------ actions
    def _create_test(self) -> None:
        metrics = [m.strip() for m in self.test_metrics.text().split(",") if m.strip()]
        req = pb.CreateAbTestRequest(
            name=self.test_name.text().strip(),
            model_a=self.arm_a.currentText().strip(),
            model_b=self.arm_b.currentText().strip(),
            traffic_split=self.split.value(),
            metrics=metrics,
        )
        resp = guarded(
            self.bar,
            lambda: self.session.admin("CreateAbTest", req),
            "Name the test, pick two versions (MODEL:VERSION or MODEL@TAG) and its metrics.",
        )
        if resp is not None:
            self._load_tests()
            self.select_test(resp.name)
            self.bar.info(f"A/B test {resp.name} is running.")

    def _end_test(self) -> None:
        name = self._selected_test()
        if name is None:
            self.bar.error("Select a test in the table first.")
            return
        winner = self.winner.currentData()
        tag = self.tag.text().strip() or "production"
        what = {
            "": "the first metric's significant winner (if any) is tagged",
            "variant_a": "variant A's version is tagged",
            "variant_b": "variant B's version is tagged",
            "none": "no version is tagged",
        }[winner]
        text = (
            f"End A/B test {name}: users are no longer assigned and no more results are "
            f"recorded; {what}" + (f" {tag!r}." if winner != "none" else ".")
        )
        if not self.confirm("End the test?", text):
            return
        req = pb.EndAbTestRequest(test_name=name, winner=winner, tag=tag)
        resp = guarded(self.bar, lambda: self.session.admin("EndAbTest", req))
        if resp is not None:
            self._load_tests()
            self.select_test(name)
            self.bar.info(f"A/B test {name} ended; winner: {resp.winner or 'none'}.")


def _quiet(call: Any) -> Any:
    """A trend needs a few values; a metric without one shows '-' instead of an error."""
    try:
        return call()
    except EXPECTED:
        return None
