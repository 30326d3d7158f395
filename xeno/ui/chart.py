"""A small line chart drawn with QPainter (PySide6-Essentials has no QtCharts)."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

VERDICT_COLORS = {"improving": "#1b7f3b", "degrading": "#c0392b", "stable": "#555555"}


class LineChart(QWidget):
    """One series against its index, with a title, the y range and the trend verdict."""

    def __init__(self, title: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.verdict = ""
        self.subtitle = ""
        self.values: list[float] = []
        self.setMinimumSize(220, 140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(320, 180)

    def set_series(self, values: Sequence[float], verdict: str = "", subtitle: str = "") -> None:
        self.values = [float(v) for v in values]
        self.verdict = verdict
        self.subtitle = subtitle
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor("#ffffff"))
        p.setPen(QColor("#bbbbbb"))
        p.drawRect(0, 0, w - 1, h - 1)
        p.setPen(QColor("#222222"))
        font = p.font()
        font.setBold(True)
        p.setFont(font)
        p.drawText(QRectF(8, 4, w - 16, 18), Qt.AlignmentFlag.AlignLeft, self.title)
        font.setBold(False)
        p.setFont(font)
        if self.verdict:
            p.setPen(QColor(VERDICT_COLORS.get(self.verdict, "#222222")))
            p.drawText(
                QRectF(8, 4, w - 16, 18), Qt.AlignmentFlag.AlignRight, self.verdict + self.subtitle
            )
        plot = QRectF(48, 26, w - 60, h - 46)
        p.setPen(QColor("#dddddd"))
        p.drawLine(plot.bottomLeft(), plot.bottomRight())
        p.drawLine(plot.bottomLeft(), plot.topLeft())
        if not self.values:
            p.setPen(QColor("#888888"))
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "no values yet")
            p.end()
            return
        lo, hi = min(self.values), max(self.values)
        if hi == lo:
            lo, hi = lo - 1.0, hi + 1.0
        p.setPen(QColor("#666666"))
        for value, y in ((hi, plot.top()), (lo, plot.bottom())):
            p.drawText(QRectF(0, y - 8, 44, 16), Qt.AlignmentFlag.AlignRight, f"{value:.3g}")
        n = len(self.values)
        p.drawText(
            QRectF(plot.left(), plot.bottom() + 2, plot.width(), 16),
            Qt.AlignmentFlag.AlignRight,
            f"{n} values",
        )

        def point(i: int, v: float) -> QPointF:
            x = plot.left() + (plot.width() * i / (n - 1) if n > 1 else plot.width() / 2)
            y = plot.bottom() - (v - lo) / (hi - lo) * plot.height()
            return QPointF(x, y)

        path = QPainterPath(point(0, self.values[0]))
        for i, v in enumerate(self.values[1:], start=1):
            path.lineTo(point(i, v))
        p.setPen(QPen(QColor("#2e6fd8"), 2))
        p.drawPath(path)
        p.setBrush(QColor("#2e6fd8"))
        for i, v in enumerate(self.values):
            p.drawEllipse(point(i, v), 2.5, 2.5)
        p.end()
