"""What the desktop app talks to: the user's device stores and the federation's admin API.

`Session` holds one user's view of the system: their encrypted assistant
store under XENO_HOME (personalization, examples, personal versions,
consent) through `xeno.model_finetuning`, and the federation's models,
versions, metrics, A/B tests and privacy ledger through the admin API,
either a running server over gRPC (`--server`, the CLI's client and TLS and
token options) or a database read in-process by the same `AdminServicer`
(`--db`, as `xeno-fl admin --db` does). The UI holds no business rule: every
decision is made by the APIs called here; this module only turns their
refusals into `UiError`s that say what to do next.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.pb import admin_pb2 as pb

__all__ = ["AdminCall", "Session", "UiError", "explain_rpc_error"]

AdminCall = Callable[[str, Any], Any]


class UiError(Exception):
    """A refusal or failure to show in the window: what happened, and what to do next."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


def explain_rpc_error(err: grpc.RpcError, server: str) -> UiError:
    """A gRPC failure of the admin API as a message with the next step."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return UiError(
            f"The server at {server} cannot be reached ({details}).",
            "Check that it runs (xeno-fl server) and that the address and TLS options are "
            "right, then press Refresh.",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UiError(
            f"The server at {server} refused the admin credentials ({details}).",
            "Give the admin token with --token-file or XENO_ADMIN_TOKEN, then restart the app.",
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return UiError(
            f"The server refused this action ({details}).",
            "It needs an admin token with a higher role (operator or admin).",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UiError(
            f"The server at {server} did not answer in time.",
            "It may be overloaded; press Refresh to try again.",
        )
    return UiError(f"{details} ({code.name})")


class _LocalContext:
    """The servicer context for in-process admin calls: an abort becomes a UiError."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise UiError(details)


@dataclass
class Session:
    """One user's app session: device stores under `home`, federation through `admin`."""

    user_id: str
    home: Path
    admin: AdminCall
    source: str  # "server HOST:PORT" or "database URL", for the window's status line
    server: str | None = None
    db_url: str | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _local: Any = None  # the _LocalAdmin, when the database is read directly (--db)
    deleted: bool = False
    _store: Any = None
    _engine: Any = None
    _trainer: Any = None

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(
        cls,
        user_id: str,
        *,
        home: str | Path | None = None,
        server: str | None = None,
        db: str | None = None,
        admin_args: argparse.Namespace | None = None,
    ) -> Session:
        """A session over a server (admin API over gRPC) or a database (in-process servicer)."""
        from client.assistant.keys import validate_user_id

        try:
            user_id = validate_user_id(user_id)
        except ValueError as exc:
            raise UiError(
                str(exc), "Start the app with --user NAME (letters, digits, _ . -)."
            ) from None
        home_path = Path(home) if home is not None else Path(os.environ.get("XENO_HOME", "data"))
        if server:
            call, close = _remote_admin(server, admin_args)
            session = cls(user_id, home_path, call, f"server {server}", server=server)
        else:
            from xeno._store import default_db_url

            url = db or default_db_url()
            local = _LocalAdmin(url)
            call, close = local, local.close
            session = cls(user_id, home_path, call, f"database {url}", db_url=url)
            session._local = local
        session._closers.append(close)
        return session

    @property
    def db_store(self) -> Any:
        """The server's store when the database is read directly (--db), else None."""
        return self._local.store if self._local is not None else None

    # ------------------------------------------------------------------ device side
    @property
    def store(self) -> Any:
        """The user's encrypted assistant store (opened on first use, shared by the tabs)."""
        if self.deleted:
            raise UiError(
                f"The data of {self.user_id} was deleted from this device.",
                "Close the app; starting it again for this user begins with an empty store.",
            )
        if self._store is None:
            from client.assistant.store import StoreError, UserStore

            try:
                self._store = UserStore(self.user_id, home=self.home)
            except StoreError as exc:
                raise UiError(
                    str(exc), "Check XENO_HOME and the device key (XENO_DEVICE_KEY or its file)."
                ) from None
            self._closers.append(self._store.close)
        return self._store

    @property
    def engine(self) -> Any:
        if self._engine is None:
            # The class xeno.model_finetuning re-exports, imported from its home: that module
            # also imports the trainer, and with it torch (seconds), which the window's
            # first tab does not need (xeno.ui.app warms it up in the background).
            from client.assistant.personalization import PersonalizationEngine

            self._engine = PersonalizationEngine(self.user_id, store=self.store)
        return self._engine

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            from xeno.model_finetuning import CustomModelTrainer

            self._trainer = CustomModelTrainer(self.user_id, store=self.store)
        return self._trainer

    def forget_device_store(self) -> None:
        """Close the user's store before it is deleted; nothing may reopen it afterwards."""
        if self._store is not None:
            self._store.close()
            self._closers.remove(self._store.close)
        self._store = self._engine = self._trainer = None
        self.deleted = True

    # ------------------------------------------------------------------ federation
    def models(self) -> list[Any]:
        return list(self.admin("ListModels", pb.ListModelsRequest()).models)

    def versions(self, model: str) -> list[Any]:
        return list(self.admin("ListVersions", pb.ListVersionsRequest(model_name=model)).versions)

    def metric_series(self, model: str) -> dict[str, list[float]]:
        """Each metric's recorded values, oldest first.

        From the performance log when the database is read directly (every metric the
        server and applications recorded); from the round history over a server, whose
        admin API gives per-round metrics but no raw metric log.
        """
        series: dict[str, list[float]] = {}
        if self.db_store is not None:
            from xeno.model_versioning import PerformanceTracker

            for row in PerformanceTracker(store=self.db_store).get_history(model):
                series.setdefault(str(row["metric"]), []).append(float(row["value"]))
            return series
        rounds = self.admin(
            "GetRoundHistory", pb.GetRoundHistoryRequest(model_name=model, limit=0)
        ).rounds
        for r in sorted(rounds, key=lambda r: r.number):
            if r.status != "completed":
                continue
            for key, value in r.metrics.items():
                series.setdefault(key, []).append(float(value))
            series.setdefault("participants", []).append(float(r.participants))
            series.setdefault("round_seconds", []).append(float(r.seconds))
        return series


def _remote_admin(
    server: str, args: argparse.Namespace | None
) -> tuple[AdminCall, Callable[[], None]]:
    from common.pb import admin_pb2_grpc
    from common.tls import client_channel
    from xeno.cli import _admin_token_value

    ns = args or argparse.Namespace()
    for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file"):
        if not hasattr(ns, name):
            setattr(ns, name, "")
    if not hasattr(ns, "token"):
        ns.token = None
    try:
        channel = client_channel(
            server, ns.tls_ca, ns.tls_cert, ns.tls_key, server_name=ns.tls_server_name
        )
        token = _admin_token_value(ns)
    except (OSError, ValueError) as exc:
        raise UiError(
            f"Cannot set up the connection to {server}: {exc}",
            "Check the --tls-* files and the admin token file.",
        ) from None
    stub = admin_pb2_grpc.AdminStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def call(method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            raise explain_rpc_error(err, server) from None

    return call, channel.close


class _LocalAdmin:
    """The admin servicer over a database, opened on the first call.

    SQLAlchemy and the migrations cost about a second of imports: the window opens
    without them, and a database that cannot be opened is an error in the tab that
    needed it, not a refusal to start.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: Any = None
        self._servicer: Any = None
        self._lock = threading.Lock()

    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from server.services.admin import AdminServicer
                from server.store.audit import set_actor
                from xeno._store import open_store

                try:
                    store = open_store(self.url)
                except Exception as exc:  # any driver or migration failure: say so
                    raise UiError(
                        f"Cannot open the database {self.url}: {exc}",
                        "Check the --db URL (sqlite:///PATH or postgresql+psycopg://...) and "
                        "that the database server runs; then press Refresh.",
                    ) from None
                set_actor(
                    f"xeno-fl ui {os.environ.get('USER', 'unknown')} (direct database access)"
                )
                self._servicer = AdminServicer(store)
                self._store = store
            return self._store

    def __call__(self, method: str, request: Any) -> Any:
        self.store  # noqa: B018 (opens it)
        return getattr(self._servicer, method)(request, _LocalContext())

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
