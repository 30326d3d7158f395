"""The XENO desktop app's window: five tabs over one user's session, and its entry point."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow, QTabWidget, QWidget

from xeno.ui.backend import Session, UiError

TAB_NAMES = ("Personalization", "Training", "Performance", "Versions", "Privacy")
MIN_SIZE = (1024, 700)


class MainWindow(QMainWindow):
    def __init__(self, session: Session) -> None:
        super().__init__()
        from xeno.ui.performance import PerformanceTab
        from xeno.ui.personalization import PersonalizationTab
        from xeno.ui.privacy import PrivacyTab
        from xeno.ui.training import TrainingTab
        from xeno.ui.versions import VersionsTab

        self.session = session
        self.setWindowTitle(f"XENO: {session.user_id}")
        self.setMinimumSize(*MIN_SIZE)
        self.resize(*MIN_SIZE)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("tabs")
        self.personalization = PersonalizationTab(session)
        self.training = TrainingTab(session)
        self.performance = PerformanceTab(session)
        self.versions = VersionsTab(session)
        self.privacy = PrivacyTab(session)
        pages: list[QWidget] = [
            self.personalization,
            self.training,
            self.performance,
            self.versions,
            self.privacy,
        ]
        for i, (name, page) in enumerate(zip(TAB_NAMES, pages, strict=True)):
            self.tabs.addTab(page, f"&{i + 1} {name}")
        self.setCentralWidget(self.tabs)
        self.status = QLabel(f"user {session.user_id} · {session.source}")
        self.statusBar().addPermanentWidget(self.status)
        # Ctrl+PgDown/PgUp switch tabs natively; Alt+1..5 (the mnemonics) jump to one.
        QShortcut(QKeySequence("Ctrl+Q"), self, self.close)
        self.tabs.currentChanged.connect(self._tab_changed)
        self._loaded: set[int] = set()
        self._tab_changed(0)

    def _tab_changed(self, index: int) -> None:
        """Load a tab's data the first time it is shown (so the window opens fast)."""
        if index in self._loaded:
            return
        self._loaded.add(index)
        page = self.tabs.widget(index)
        refresh = getattr(page, "refresh", None)
        if refresh is not None:
            refresh()

    def page(self, name: str) -> QWidget:
        page = self.tabs.widget(TAB_NAMES.index(name))
        assert page is not None
        return page

    def closeEvent(self, event: object) -> None:  # noqa: N802 (Qt's name)
        self.training.cancel_running()
        self.session.close()
        super().closeEvent(event)  # type: ignore[arg-type]


def warm_up(session: Session | None = None) -> threading.Thread:
    """Import what the other tabs need (torch, Opacus: seconds) while the user looks around.

    With a session over a database, also open it (SQLAlchemy, the schema check).
    """

    def load() -> None:
        if session is not None:
            with contextlib.suppress(Exception):  # a bad database is the tabs' error to show
                _ = session.db_store
        import common.privacy
        import server.services.admin
        import xeno.model_finetuning
        import xeno.model_versioning

        with contextlib.suppress(Exception):  # only a warm-up: the tabs report real errors
            from opacus.accountants import RDPAccountant

            RDPAccountant()
        del common.privacy, server.services.admin, xeno.model_finetuning, xeno.model_versioning

    thread = threading.Thread(target=load, name="ui-warm-up", daemon=True)
    thread.start()
    return thread


def application() -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setApplicationName("XENO")
    assert isinstance(app, QApplication)
    return app


def screenshots(window: MainWindow, folder: Path) -> list[Path]:
    """A PNG of the window on each tab, named after the tab."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    app = application()
    for i, name in enumerate(TAB_NAMES):
        window.tabs.setCurrentIndex(i)
        # Loading a tab changes its layout, which settles over a few posted events.
        for _ in range(3):
            app.processEvents()
        path = folder / f"{i + 1}-{name.lower()}.png"
        window.grab().save(str(path))
        out.append(path)
    window.tabs.setCurrentIndex(0)
    return out


def demo_place(args: argparse.Namespace) -> tuple[Path, str]:
    """Where --demo keeps its data: --home (or $XENO_HOME/ui-demo) and its own database."""
    home = Path(args.home) if args.home else Path("data") / "ui-demo"
    return home, args.db or f"sqlite:///{home}/xeno.db"


def open_session(args: argparse.Namespace) -> Session:
    home = Path(args.home) if args.home else None
    if args.demo:
        home, db = demo_place(args)
        return Session.open(args.user, home=home, db=db)
    if args.server and args.db:
        raise UiError("Give --server or --db, not both.")
    return Session.open(args.user, home=home, server=args.server, db=args.db, admin_args=args)


def run(args: argparse.Namespace) -> int:
    """`xeno-fl ui`: open the window (or write the screenshots and exit)."""
    if args.screenshot:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # The demo's in-process federation logs every device step; the window shows what matters.
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    # Small budgets make Opacus point out its smallest order; the figure is still an upper bound.
    warnings.filterwarnings("ignore", "Optimal order is the smallest alpha")
    app = application()
    if args.demo:
        from xeno.ui.demo import seed_demo

        home, db = demo_place(args)
        seeding = time.perf_counter()
        seed_demo(home, db, args.user)
        print(f"demo ready in {home} ({time.perf_counter() - seeding:.1f} s)")
    started = time.perf_counter()
    try:
        session = open_session(args)
    except UiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    window = MainWindow(session)
    window.show()
    app.processEvents()
    opened = time.perf_counter() - started
    warm = warm_up(session)
    if args.screenshot:
        warm.join()
        for path in screenshots(window, Path(args.screenshot)):
            print(f"wrote {path}")
        print(f"window opened in {opened:.2f} s")
        window.close()
        return 0
    window.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    return int(app.exec())
