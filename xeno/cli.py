"""`xeno-fl`: one command with subcommands for operators, devices and simulations.

    xeno-fl server    run the aggregation server
    xeno-fl client    run a device client
    xeno-fl simulate  a server and N device processes on this machine
    xeno-fl admin     inspect models, versions and rounds
    xeno-fl user      a user's assistant data: export, delete, consent, retention

Every flag also reads an environment variable (shown in --help); a flag
wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atrest import DataKeyError
from common.config import add_arguments, from_namespace

if TYPE_CHECKING:
    from client.runtime import ClientConfig


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        from server.observability import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("opacus").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argv names (the first word that is not a global option or its value)."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; for one command, only that command's flags are defined.

    The flags of `client` and `simulate` come from modules that import torch (2-9 s on a
    loaded machine): `xeno-fl server` must not pay for them before it serves.
    """
    from server.app import ServerConfig

    parser = argparse.ArgumentParser(
        prog="xeno-fl", description=__doc__, formatter_class=_Formatter
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("XENO_LOG_LEVEL", "info"),
        help="debug, info, warning or error (default: info) [env XENO_LOG_LEVEL]",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("XENO_LOG_FORMAT", "text"),
        help="text, or json: one object per line with round and device ids [env XENO_LOG_FORMAT]",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "server",
        help="run the aggregation server",
        description="Run the aggregation server: devices connect to it over gRPC; rounds, "
        "versions and metrics are stored in the database given by --db.",
    )
    add_arguments(p, ServerConfig)

    p = sub.add_parser(
        "client",
        help="run a device client",
        description="Run one device: it registers with the server, then trains on its own data "
        "partition whenever it is selected for a round, until the federation finishes or "
        "it receives SIGTERM. With --user, the DP limits saved for that user in the app's "
        "Privacy tab (minimum noise multiplier, epsilon budget) are enforced; "
        "--min-noise-multiplier and --max-user-epsilon (or their environment variables) "
        "override them.",
    )
    if command in (None, "client"):
        from client.runtime import ClientConfig

        add_arguments(p, ClientConfig)

    p = sub.add_parser(
        "simulate",
        help="simulate a federation on this machine",
        description="Start a real server and --clients device processes on 127.0.0.1, run "
        "--rounds rounds on the digits data split by a Dirichlet label partition, show "
        "progress and print the accuracy per round.",
    )
    if command in (None, "simulate"):
        from xeno.simulation import SimulationConfig

        add_arguments(p, SimulationConfig)

    p = sub.add_parser(
        "privacy",
        help="privacy planning: epsilon of a DP configuration",
        description="Privacy tools for operators. `estimate` prints the epsilon a configuration "
        "spends (every figure from a tested accountant: Opacus RDP/PRV for Gaussian noise, "
        "the Skellam RDP bound of Agarwal et al. 2021), or with --target-epsilon the noise "
        "multiplier needed.",
    )
    privacy_sub = p.add_subparsers(dest="privacy_command", required=True, metavar="WHAT")
    q = privacy_sub.add_parser(
        "estimate",
        help="epsilon of a mechanism, or the noise for a target epsilon",
        description="Example: xeno-fl privacy estimate --mechanism gaussian "
        "--noise-multiplier 1.1 --sample-rate 0.01 --steps 10000 --delta 1e-5",
    )
    q.add_argument(
        "--mechanism",
        choices=["gaussian", "skellam"],
        default="gaussian",
        help="noise distribution (default: gaussian)",
    )
    q.add_argument(
        "--noise-multiplier", type=float, help="noise standard deviation / L2 sensitivity"
    )
    q.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="probability that a record (or user) is in a step (default: 1)",
    )
    q.add_argument("--steps", type=int, required=True, help="number of steps (or rounds)")
    q.add_argument("--delta", type=float, default=1e-5, help="target delta (default: 1e-5)")
    q.add_argument(
        "--accountant",
        choices=["rdp", "prv"],
        default="rdp",
        help="Opacus accountant for the Gaussian (default: rdp)",
    )
    q.add_argument(
        "--target-epsilon",
        type=float,
        help="instead: the smallest noise multiplier reaching this epsilon",
    )
    q.add_argument(
        "--l2-sensitivity",
        type=float,
        default=2.0**16,
        help="Skellam only: L2 sensitivity in quantized integer units (default: 65536)",
    )
    q.add_argument(
        "--dimension",
        type=int,
        default=5258,
        help="Skellam only: vector dimension, bounds the L1 sensitivity (default: 5258)",
    )
    q.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "admin",
        help="inspect models, versions and rounds",
        description="Query a running server's Admin service (--server), or read a database "
        "directly (--db) when no server runs.",
    )
    add_admin_connection_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    admin_sub = p.add_subparsers(dest="admin_command", required=True, metavar="WHAT")
    _add_models_commands(admin_sub)
    _add_certs_commands(admin_sub)
    audit = admin_sub.add_parser(
        "audit",
        help="the tamper-evident audit log (--server, role admin, or --db): list entries, "
        "or verify the hash chain",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="WHAT")
    q = audit_sub.add_parser("list", help="entries, oldest first")
    q.add_argument("--limit", type=int, default=0, help="only the newest N")
    q = audit_sub.add_parser(
        "verify", help="recompute the chain; exit 1 and name the first bad row if broken"
    )
    q.add_argument("--head", default="", help="a head hash saved earlier: it must be in the chain")
    admin_sub.add_parser(
        "health", help="exit 0 when the server reports SERVING (for container health checks)"
    )
    keygen = admin_sub.add_parser(
        "keygen",
        help="create a data key file (owner-only) for XENO_DATA_KEY_FILE / XENO_DEVICE_KEY_FILE",
    )
    keygen.add_argument("path", help="where to write the key; an existing file is kept")
    rotate = admin_sub.add_parser(
        "rotate-key",
        help="re-seal every sealed value and re-MAC every version under a new data key (--db; "
        "offline: stop the server first); run it again to finish an interrupted rotation",
    )
    rotate.add_argument(
        "--new-key-file", required=True, help="the new key (make it with `admin keygen F`)"
    )
    rotate.add_argument(
        "--key-file",
        default=os.environ.get("XENO_DATA_KEY_FILE", ""),
        help="the current key file (default: XENO_DATA_KEY, else xeno.key next to a SQLite "
        "database, else data/xeno.key) [env XENO_DATA_KEY_FILE]",
    )
    rotate.add_argument("--batch", type=int, default=100, help="rows per transaction")
    db = admin_sub.add_parser("db", help="database schema: upgrade (migrate) or show the revision")
    db.add_argument(
        "action",
        choices=["upgrade", "current"],
        help="upgrade: run the migrations up to the newest; current: print the revision",
    )
    for name, text in (
        ("versions", "list a model's versions with metrics"),
        ("rounds", "a model's round history"),
        (
            "evaluations",
            "a model's federated evaluations: per evaluated version the devices, the held-out "
            "examples, the federated (and personalized) accuracy beside the server-side one",
        ),
        (
            "privacy-report",
            "a model's privacy ledger: per round the mechanism, noise, cohort and clip, the "
            "cumulative (epsilon, delta) with its status, and per-device summaries",
        ),
    ):
        q = admin_sub.add_parser(name, help=text)
        q.add_argument(
            "--model",
            default=os.environ.get("XENO_MODEL", "digits-mlp"),
            help="model name (default: digits-mlp) [env XENO_MODEL]",
        )
        if name == "rounds":
            q.add_argument("--limit", type=int, default=0, help="only the last N rounds")
    _add_lifecycle_commands(admin_sub)
    _add_ab_commands(admin_sub)
    _add_user_parser(sub)
    from xeno.ui import add_parser as add_ui_parser

    add_ui_parser(sub)
    return parser


def add_admin_connection_flags(p: argparse.ArgumentParser, show_token: bool = True) -> None:
    """--server or --db, the admin token and TLS flags: `xeno-fl admin` and `xeno-fl ui`."""
    p.add_argument(
        "--server", default=os.environ.get("XENO_SERVER"), help="server HOST:PORT [env XENO_SERVER]"
    )
    p.add_argument("--db", default=None, help="read this database URL directly instead")
    p.add_argument(
        "--token-file",
        default=os.environ.get("XENO_ADMIN_TOKEN_FILE", ""),
        help="file holding the admin bearer token (one line: the token, or NAME ROLE TOKEN) "
        "[env XENO_ADMIN_TOKEN_FILE]",
    )
    p.add_argument(
        "--token",
        default=None,
        help="the admin bearer token itself (shows in process listings: prefer --token-file "
        "or XENO_ADMIN_TOKEN) [env XENO_ADMIN_TOKEN]"
        if show_token
        else argparse.SUPPRESS,
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("XENO_TLS_CA", ""),
        help="PEM CA certificate of the server: connect over TLS [env XENO_TLS_CA]",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("XENO_TLS_CERT", ""),
        help="PEM admin certificate for mTLS [env XENO_TLS_CERT]",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("XENO_TLS_KEY", ""),
        help="PEM private key of --tls-cert [env XENO_TLS_KEY]",
    )
    p.add_argument(
        "--tls-server-name",
        default=os.environ.get("XENO_TLS_SERVER_NAME", ""),
        help="host name expected in the server's certificate if not the one in --server "
        "[env XENO_TLS_SERVER_NAME]",
    )


def _add_models_commands(admin_sub: Any) -> None:
    models = admin_sub.add_parser(
        "models",
        help="the models: list (the default), or create, pause, resume, delete one on a running "
        "server",
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="WHAT")
    models_sub.add_parser("list", help="each model: version, task, strategy, state")
    q = models_sub.add_parser(
        "create",
        help="create a model and start training it (role operator)",
        description="Settings are named like the server's flags; unset ones take the "
        "server's values. Example: models create intents-b --task intents --set rounds=50 "
        "--set strategy=fedadam",
    )
    q.add_argument("name", help="the new model's name (letters, digits, '.', '_', '-')")
    q.add_argument("--task", default=None, help="digits or intents (default: the server's)")
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting, e.g. rounds=50 or dp=distributed (repeatable; VALUE in TOML syntax, "
        "a bare word is a string)",
    )
    q.add_argument("--paused", action="store_true", help="create it paused")
    q = models_sub.add_parser(
        "evaluate",
        help="schedule an evaluation-only round of a version: devices that check in score it "
        "on their own held-out data and report counts, summed under secure aggregation "
        "(role operator); see `xeno-fl admin evaluations`",
    )
    q.add_argument("name", nargs="?", default=None, help="the model (or --model)")
    q.add_argument("--model", dest="model_name", default=None, help="the model")
    q.add_argument("--version", type=int, default=0, help="the version (default: the head)")
    for action, text in (
        ("pause", "start no more rounds of the model; an open round finishes (role operator)"),
        ("resume", "start the model's rounds again (role operator)"),
        (
            "delete",
            "stop training the model and remove its definition, so that a restart does not "
            "train it again (unless the models file still names it); its versions, rounds and "
            "privacy ledger are kept: history is never rewritten. Not the default model "
            "(role admin)",
        ),
    ):
        q = models_sub.add_parser(action, help=text)
        q.add_argument("name", help="the model")


def _settings_toml(task: str | None, assignments: list[str]) -> str:
    """TOML lines from --task and KEY=VALUE pairs; a VALUE that is no TOML value is a string."""
    import tomllib

    lines = [f"task = {json.dumps(task)}"] if task else []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        try:
            tomllib.loads(f"v = {value.strip()}")
            literal = value.strip()
        except tomllib.TOMLDecodeError:
            literal = json.dumps(value.strip())
        lines.append(f"{key.strip()} = {literal}")
    return "\n".join(lines) + "\n"


def _admin_models(args: argparse.Namespace, call: Any) -> int:
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console
    from rich.table import Table

    from common.pb import admin_pb2 as pb

    command = args.models_command or "list"
    if command == "create":
        request = pb.CreateModelRequest(
            name=args.name, settings_toml=_settings_toml(args.task, args.set), paused=args.paused
        )
        info = call("CreateModel", request)
    elif command == "pause":
        info = call("PauseModel", pb.PauseModelRequest(name=args.name))
    elif command == "resume":
        info = call("ResumeModel", pb.ResumeModelRequest(name=args.name))
    elif command == "delete":
        info = call("DeleteModel", pb.DeleteModelRequest(name=args.name))
    elif command == "evaluate":
        name = args.name or args.model_name
        if not name or (args.name and args.model_name and args.name != args.model_name):
            raise SystemExit("error: name one model (NAME or --model)")
        queued = call("EvaluateModel", pb.EvaluateModelRequest(name=name, version=args.version))
        if args.json:
            print(json.dumps(MessageToDict(queued, preserving_proto_field_name=True), indent=2))
        else:
            print(
                f"model {queued.name}: evaluation of version {queued.version} scheduled "
                f"({queued.queued} queued); its result: xeno-fl admin evaluations --model "
                f"{queued.name}"
            )
        return 0
    else:
        resp = call("ListModels", pb.ListModelsRequest())
        if args.json:
            print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
            return 0
        table = Table()
        for c in ("model", "version", "task", "strategy", "state", "parameters", "config"):
            table.add_column(c)
        for m in resp.models:
            state = "paused" if m.paused else ("training" if m.training else "-")
            table.add_row(
                m.name,
                str(m.current_version),
                m.task or "-",
                m.strategy,
                state,
                str(m.num_parameters),
                m.spec.config_json,
            )
        Console().print(table)
        return 0
    if args.json:
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))
    else:
        state = "paused" if info.paused else ("training" if info.training else "not trained")
        task = info.task or "-"
        print(f"model {info.name}: version {info.current_version}, task {task}, {state}")
    return 0


def _add_certs_commands(admin_sub: Any) -> None:
    certs = admin_sub.add_parser(
        "certs",
        help="project CA and certificates for TLS/mTLS (no openssl needed)",
        description="`certs init DIR` creates the project CA (DIR/ca.crt, DIR/ca.key); "
        "`certs issue DIR --server HOST[,HOST...]`, `--device NAME` or `--admin NAME --role "
        "ROLE` signs a certificate with it: DIR/<kind>-<name>.crt and .key (owner-only).",
    )
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="WHAT")
    q = certs_sub.add_parser("init", help="create the project CA in DIR")
    q.add_argument("dir")
    q.add_argument("--days", type=int, default=3650, help="validity (default: 3650)")
    q = certs_sub.add_parser("issue", help="issue a server, device or admin certificate")
    q.add_argument("dir", help="the folder of the project CA; the certificate goes there too")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--server", metavar="HOSTNAME", help="host names/IPs, comma-separated")
    who.add_argument("--device", metavar="NAME")
    who.add_argument("--admin", metavar="NAME")
    q.add_argument("--role", help="an admin's role: viewer, operator or admin")
    q.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    q = certs_sub.add_parser(
        "revoke",
        help="revoke a client certificate (--server: at once; --db: within the server's "
        "--revocation-refresh): by SERIAL, by its --cert file, or every certificate of a "
        "--device or --admin name issued until now",
    )
    q.add_argument("serial", nargs="?", default="", help="serial number (hex)")
    what = q.add_mutually_exclusive_group()
    what.add_argument("--device", metavar="NAME", default="")
    what.add_argument("--admin", metavar="NAME", default="")
    what.add_argument("--cert", metavar="FILE", default="", help="the certificate's PEM file")
    q.add_argument("--reason", default="", help="why (kept in the list and the audit log)")
    certs_sub.add_parser("revoked", help="the revocation list (--server or --db)")
    token = admin_sub.add_parser(
        "token", help="admin bearer tokens with roles, for the server's --admin-token-file"
    )
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="WHAT")
    q = token_sub.add_parser(
        "add",
        help="append NAME ROLE TOKEN with a new random token to FILE (owner-only) and "
        "write the token alone to --out (for the admin's --token-file)",
    )
    q.add_argument("file")
    q.add_argument("name")
    q.add_argument("--role", required=True, help="viewer, operator or admin")
    q.add_argument("--out", default="", help="also write the token to this file (0600)")


def _add_user_parser(sub: Any) -> None:
    from client.assistant.consent import Scope

    p = sub.add_parser(
        "user",
        help="a user's assistant data on this device: export, delete, consent, retention",
        description="The assistant's per-user encrypted store under --home (XENO_HOME). "
        "The device key comes from XENO_DEVICE_KEY, XENO_DEVICE_KEY_FILE, the OS keyring, "
        "or $XENO_HOME/device.key.",
    )
    p.add_argument(
        "--home",
        default=os.environ.get("XENO_HOME") or "./data",
        help="folder of the assistant's data (default: ./data) [env XENO_HOME]",
    )
    user_sub = p.add_subparsers(dest="user_command", required=True, metavar="WHAT")
    q = user_sub.add_parser("export", help="everything kept for the user, as one JSON archive")
    q.add_argument("user_id")
    q.add_argument("--out", default=None, help="write the archive here (0600); else stdout")
    q = user_sub.add_parser(
        "delete", help="erase the user's store (crypto-shredding: its key is destroyed)"
    )
    q.add_argument("user_id")
    q.add_argument("--yes", action="store_true", help="confirm; nothing is deleted without it")
    q.add_argument(
        "--server",
        default=None,
        help="also ask this aggregation server (HOST:PORT) to erase the device's records",
    )
    q.add_argument(
        "--state-dir",
        default=os.environ.get("XENO_STATE_DIR"),
        help="the device client's state folder (default: $XENO_HOME/device) [env XENO_STATE_DIR]",
    )
    q = user_sub.add_parser(
        "consent", help="grant or revoke a consent scope; without flags, show the history"
    )
    q.add_argument("user_id")
    scopes = [s.value for s in Scope]
    q.add_argument("--grant", choices=scopes, default=None)
    q.add_argument("--revoke", choices=scopes, default=None)
    q = user_sub.add_parser(
        "retention", help="set how many days episodes and interactions are kept; or show it"
    )
    q.add_argument("user_id")
    q.add_argument("--days", type=float, default=None)


def _model_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--model",
        default=os.environ.get("XENO_MODEL", "digits-mlp"),
        help="model name (default: digits-mlp) [env XENO_MODEL]",
    )


def _add_ab_commands(admin_sub: Any) -> None:
    ab = admin_sub.add_parser(
        "ab", help="A/B tests of model versions across the fleet: create, list, show, analyze, end"
    )
    ab_sub = ab.add_subparsers(dest="ab_command", required=True, metavar="WHAT")
    q = ab_sub.add_parser(
        "create", help="start a test between two versions (devices learn their arm at check-in)"
    )
    q.add_argument("name")
    q.add_argument("model_a", help="variant_a: NAME (its head now), NAME:VERSION or NAME@TAG")
    q.add_argument("model_b", help="variant_b, the same forms")
    q.add_argument(
        "--split",
        type=float,
        default=0.5,
        help="share of users in variant_a, strictly between 0 and 1 (default: 0.5)",
    )
    q.add_argument(
        "--metrics",
        required=True,
        help="comma-separated metrics the test measures, e.g. user_satisfaction,inference_latency",
    )
    ab_sub.add_parser("list", help="every test, running and ended")
    q = ab_sub.add_parser("show", help="one test: arms, split, metrics, status")
    q.add_argument("name")
    q = ab_sub.add_parser(
        "analyze", help="per metric: arm means, difference, 95%% interval, p-value, winner"
    )
    q.add_argument("name")
    q.add_argument(
        "--method",
        choices=("welch", "sequential"),
        default="welch",
        help="welch: look once, at a sample size fixed in advance; sequential (mSPRT): valid "
        "when analyzed after every result (default: welch)",
    )
    q = ab_sub.add_parser("end", help="stop the test and tag the winner's version")
    q.add_argument("name")
    q.add_argument(
        "--winner",
        choices=("variant_a", "variant_b", "none"),
        default="",
        help="default: the first metric's significant winner (refused when there is none)",
    )
    q.add_argument("--tag", default="production", help="tag for the winner (default: production)")
    q = ab_sub.add_parser("assign", help="a user's (or device's) sticky variant")
    q.add_argument("name")
    q.add_argument("user_id")


def _admin_ab(args: argparse.Namespace, call: Any) -> int:
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console
    from rich.table import Table

    from common.pb import admin_pb2 as pb

    cmd = args.ab_command
    resp: Any
    if cmd == "create":
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        resp = call(
            "CreateAbTest",
            pb.CreateAbTestRequest(
                name=args.name,
                model_a=args.model_a,
                model_b=args.model_b,
                traffic_split=args.split,
                metrics=metrics,
            ),
        )
    elif cmd == "list":
        resp = call("ListAbTests", pb.ListAbTestsRequest())
    elif cmd == "show":
        tests = call("ListAbTests", pb.ListAbTestsRequest()).tests
        found = [t for t in tests if t.name == args.name]
        if not found:
            known = ", ".join(t.name for t in tests) or "none"
            print(f"error: no A/B test {args.name!r}; tests: {known}", file=sys.stderr)
            return 2
        resp = found[0]
    elif cmd == "analyze":
        resp = call(
            "AnalyzeAbTest", pb.AnalyzeAbTestRequest(test_name=args.name, method=args.method)
        )
    elif cmd == "end":
        resp = call(
            "EndAbTest", pb.EndAbTestRequest(test_name=args.name, winner=args.winner, tag=args.tag)
        )
    else:
        resp = call(
            "AssignVariant", pb.AssignVariantRequest(test_name=args.name, user_id=args.user_id)
        )
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    console = Console()

    def arm(a: Any) -> str:
        return f"{a.model_name} v{a.version}"

    if cmd == "list":
        table = Table(title="A/B tests")
        for col in ("test", "status", "variant_a", "variant_b", "split", "metrics", "winner"):
            table.add_column(col)
        for t in resp.tests:
            table.add_row(
                t.name,
                t.status,
                arm(t.variant_a),
                arm(t.variant_b),
                f"{t.traffic_split:g}",
                ", ".join(t.metrics),
                t.winner or "-",
            )
        console.print(table if resp.tests else "no A/B tests")
    elif cmd in ("create", "show", "end"):
        console.print(
            f"A/B test {resp.name} ({resp.status}): variant_a {arm(resp.variant_a)} for "
            f"{resp.traffic_split:.0%} of users, variant_b {arm(resp.variant_b)}; metrics "
            f"{', '.join(resp.metrics)}" + (f"; winner {resp.winner}" if resp.winner else "")
        )
    elif cmd == "analyze":
        table = Table(title=f"A/B test {args.name}: variant_b - variant_a ({resp.method})")
        for col in ("metric", "n a", "n b", "mean a", "mean b", "diff", "95% CI", "p", "winner"):
            table.add_column(col)
        sequential = resp.method == "sequential"
        for key, m in sorted(resp.metrics.items()):
            lo, hi, p = (
                ("sequential_ci_low", "sequential_ci_high", "sequential_p_value")
                if sequential
                else ("ci_low", "ci_high", "p_value")
            )
            ci = f"[{getattr(m, lo):.4g}, {getattr(m, hi):.4g}]" if m.HasField(lo) else "-"
            table.add_row(
                key,
                str(m.count_a),
                str(m.count_b),
                f"{m.variant_a_mean:.4g}" if m.HasField("variant_a_mean") else "-",
                f"{m.variant_b_mean:.4g}" if m.HasField("variant_b_mean") else "-",
                f"{m.difference:+.4g}" if m.HasField("difference") else "-",
                ci,
                f"{getattr(m, p):.3g}" if m.HasField(p) else "-",
                m.winner,
            )
        console.print(table)
        r = resp.sample_ratio
        flag = "[bold red]MISMATCH[/bold red]" if r.mismatch else "ok"
        console.print(
            f"sample ratio: {r.count_a} / {r.count_b} against a split of "
            f"{r.expected_share_a:g} (chi-square p {r.p_value:.3g}): {flag}"
        )
    else:
        console.print(f"{args.user_id}: {resp.variant} ({arm(resp.arm)})")
    return 0


def _add_lifecycle_commands(admin_sub: Any) -> None:
    q = admin_sub.add_parser("show", help="one version's record (default: the head)")
    _model_flag(q)
    q.add_argument("version", nargs="?", default="", help="version number or tag (default: head)")
    q = admin_sub.add_parser(
        "rollback",
        help="make a new head version with an older version's weights (history is kept; a "
        "running server trains from it next round, a round in flight fails as superseded)",
    )
    _model_flag(q)
    q.add_argument("target", type=int, help="the version whose weights become the new head")
    q.add_argument("--reason", default="", help="why; recorded with the new version")
    q.add_argument(
        "--operator",
        default=os.environ.get("USER", "admin"),
        help="who; recorded as created_by (default: $USER)",
    )
    q = admin_sub.add_parser(
        "compare", help="metric changes and weight distance (L2, cosine) between two versions"
    )
    _model_flag(q)
    q.add_argument("version_a", type=int)
    q.add_argument("version_b", type=int)
    q = admin_sub.add_parser(
        "tag", help="point a tag (production, staging, any name) at a version, or --remove it"
    )
    _model_flag(q)
    q.add_argument("tag")
    q.add_argument("version", nargs="?", type=int, default=0, help="default: the head")
    q.add_argument("--remove", action="store_true", help="remove the tag")
    q.add_argument("--operator", default=os.environ.get("USER", "admin"), help="who")
    q = admin_sub.add_parser(
        "prune",
        help="delete all but the newest --keep versions; tagged and A/B-tested versions and "
        "the head are always kept",
    )
    _model_flag(q)
    q.add_argument("--keep", type=int, default=3, help="newest versions to keep (default: 3)")
    q = admin_sub.add_parser(
        "alerts",
        help="degradation alerts: a degrading trend, or a value k standard deviations worse "
        "than its recent baseline",
    )
    q.add_argument("--model", default="", help="only this model (default: all)")
    q.add_argument("--metric", default="", help="only this metric")
    q.add_argument("--limit", type=int, default=100, help="newest N (default: 100)")
    q = admin_sub.add_parser(
        "trend", help="a metric's trend: Mann-Kendall test and Theil-Sen slope"
    )
    _model_flag(q)
    q.add_argument("metric", help="e.g. accuracy, loss, round_seconds")
    q.add_argument("--window", type=int, default=0, help="newest N values (default: all)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, DataKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    for flag, instead in (
        ("enrollment_key", "--enrollment-key-file or XENO_ENROLLMENT_KEY"),
        ("admin_token", "--admin-token-file or XENO_ADMIN_TOKEN"),
    ):
        if getattr(args, flag, None):
            _warn_flag_secret("--" + flag.replace("_", "-"), instead)
    if args.command == "server":
        from server.app import ServerConfig, serve

        return serve(from_namespace(ServerConfig, args))
    if args.command == "client":
        from client.runtime import run_device

        return run_device(client_config(args))
    if args.command == "simulate":
        from xeno.simulation import SimulationConfig, simulate

        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        return simulate(from_namespace(SimulationConfig, args))
    if args.command == "privacy":
        return _privacy(args)
    if args.command == "user":
        return _user(args)
    if args.command == "ui":
        from xeno.ui import main as ui_main

        return ui_main(args)
    return _admin(args)


# The limits a user can save for their device (Privacy tab), with the variables that, like
# the flags, take precedence over them.
SAVED_LIMITS = (
    ("min_noise_multiplier", "XENO_MIN_NOISE_MULTIPLIER"),
    ("max_user_epsilon", "XENO_MAX_USER_EPSILON"),
)


def client_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """The device's ClientConfig: flags, then environment, then (with --user) saved limits.

    The DP limits a user saved in the Privacy tab apply wherever neither a
    flag nor its environment variable sets them.
    """
    from client.assistant.dp_limits import saved_dp_limits
    from client.runtime import ClientConfig

    environ = os.environ if environ is None else environ
    user = getattr(args, "user", None) or environ.get("XENO_USER", "")
    overrides: dict[str, Any] = {}
    if user:
        limits = saved_dp_limits(user)
        if limits is not None:
            for name, env in SAVED_LIMITS:
                if getattr(args, name, None) is None and env not in environ:
                    overrides[name] = getattr(limits, name)
    if overrides:
        logging.getLogger(__name__).info(
            "enforcing the DP limits saved for user %s: %s", user, overrides
        )
    return from_namespace(ClientConfig, args, environ, **overrides)


def _privacy(args: argparse.Namespace) -> int:
    from common.privacy import estimate, noise_for_epsilon, skellam_noise_for_epsilon

    out: dict[str, Any]
    if args.target_epsilon is not None:
        if args.mechanism == "gaussian":
            z = noise_for_epsilon(
                args.target_epsilon, args.sample_rate, args.steps, args.delta, args.accountant
            )
            how = f"at sample rate {args.sample_rate} ({args.accountant})"
        else:
            if args.accountant != "rdp":
                raise ValueError("the Skellam mechanism is accounted with RDP only")
            z = skellam_noise_for_epsilon(
                args.target_epsilon, args.steps, args.delta, args.l2_sensitivity, args.dimension
            )
            how = (
                f"(skellam, L2 sensitivity {args.l2_sensitivity:g}, dimension {args.dimension}; "
                "no amplification by sampling is claimed)"
            )
        out = {
            "noise_multiplier": round(z, 4),
            "target_epsilon": args.target_epsilon,
            "delta": args.delta,
            "mechanism": args.mechanism,
            "sample_rate": args.sample_rate,
            "steps": args.steps,
            "accountant": args.accountant,
        }
        text = (
            f"noise multiplier {z:.4f} gives epsilon <= {args.target_epsilon} at delta "
            f"{args.delta} over {args.steps} steps {how}"
        )
    else:
        if args.noise_multiplier is None:
            raise ValueError("give --noise-multiplier (or --target-epsilon)")
        result = estimate(
            args.mechanism,
            args.noise_multiplier,
            args.sample_rate,
            args.steps,
            args.delta,
            args.accountant,
            args.l2_sensitivity,
            args.dimension,
        )
        out = {
            "epsilon": round(result.epsilon, 6),
            "delta": result.delta,
            "mechanism": result.mechanism.value,
            "accountant": result.accountant.value,
            "noise_multiplier": result.noise_multiplier,
            "sample_rate": result.sample_rate,
            "steps": result.steps,
        }
        if result.note:
            out["note"] = result.note
        text = (
            f"epsilon {result.epsilon:.4f} at delta {result.delta} "
            f"({result.mechanism.value}, {result.accountant.value} accountant)"
            + (f"; {result.note}" if result.note else "")
        )
    print(json.dumps(out) if args.json else text)
    return 0


def _admin(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console
    from rich.table import Table

    from common.pb import admin_pb2 as pb

    if args.admin_command == "db":
        return _admin_db(args)
    if args.admin_command == "health":
        return _admin_health(args)
    if args.admin_command == "certs":
        return _admin_certs(args)
    if args.admin_command == "audit":
        return _admin_audit(args)
    if args.admin_command == "token":
        return _admin_token(args)
    if args.admin_command == "rotate-key":
        return _admin_rotate_key(args)
    if args.admin_command == "keygen":
        from common.atrest import write_new_key

        try:
            write_new_key(args.path)
        except FileExistsError:
            print(f"error: {args.path} exists; refusing to overwrite a key", file=sys.stderr)
            return 2
        print(f"wrote a new data key to {args.path} (keep it: data sealed with it needs it)")
        return 0
    if bool(args.server) == bool(args.db):
        print("error: give exactly one of --server HOST:PORT or --db URL", file=sys.stderr)
        return 2
    call = _admin_caller(args)
    if args.admin_command == "privacy-report":
        return _privacy_report(
            call("GetPrivacyReport", pb.GetPrivacyReportRequest(model_name=args.model)), args.json
        )
    if args.admin_command == "ab":
        return _admin_ab(args, call)
    if args.admin_command in ("show", "rollback", "compare", "tag", "prune", "alerts", "trend"):
        return _admin_lifecycle(args, call)
    rows: list[tuple[Any, ...]]
    cols: tuple[str, ...]
    if args.admin_command == "models":
        return _admin_models(args, call)
    if args.admin_command == "versions":
        resp: Any = call("ListVersions", pb.ListVersionsRequest(model_name=args.model))
        rows = [
            (
                v.version,
                v.parent_version or "-",
                v.created_by,
                v.round_number or "-",
                _fmt(v.metrics.get("accuracy")),
                _fmt(v.metrics.get("loss")),
                v.sha256[:12],
                ",".join(v.tags),
                v.description,
            )
            for v in resp.versions
        ]
        cols = (
            "version",
            "parent",
            "created by",
            "round",
            "accuracy",
            "loss",
            "sha256",
            "tags",
            "description",
        )
    elif args.admin_command == "evaluations":
        resp = call("GetRoundHistory", pb.GetRoundHistoryRequest(model_name=args.model))
        versions = call("ListVersions", pb.ListVersionsRequest(model_name=args.model))
        server_side = {v.version: v.metrics.get("accuracy") for v in versions.versions}
        rows = [
            (
                r.number,
                r.base_version,
                int(r.metrics.get("eval_devices", 0)),
                int(r.metrics.get("eval_examples", 0)),
                _fmt(r.metrics.get("federated_accuracy")),
                _fmt(r.metrics.get("federated_personalized_accuracy")),
                _fmt(server_side.get(r.base_version)),
                _fmt(r.metrics.get("dp_epsilon")),
            )
            for r in resp.rounds
            if r.status == "evaluated"
        ]
        cols = (
            "round",
            "version",
            "devices",
            "examples",
            "federated accuracy",
            "personalized",
            "server-side accuracy",
            "epsilon",
        )
    else:
        resp = call(
            "GetRoundHistory", pb.GetRoundHistoryRequest(model_name=args.model, limit=args.limit)
        )
        rows = [
            (
                r.number,
                r.status,
                r.result_version or (r.base_version if r.status == "evaluated" else "-"),
                f"{r.participants}/{r.selected}",
                r.dropouts,
                _fmt(r.metrics.get("accuracy")),
                _fmt(r.metrics.get("federated_accuracy")),
                f"{r.seconds:.2f}",
                r.failure_reason,
            )
            for r in resp.rounds
        ]
        cols = (
            "round",
            "status",
            "version",
            "participants",
            "dropouts",
            "accuracy",
            "federated accuracy",
            "seconds",
            "failure",
        )
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    table = Table()
    for c in cols:
        table.add_column(c)
    for row in rows:
        table.add_row(*[str(x) for x in row])
    Console().print(table)
    return 0


def _admin_lifecycle(args: argparse.Namespace, call: Any) -> int:
    from datetime import UTC, datetime

    from google.protobuf.json_format import MessageToDict
    from rich.console import Console
    from rich.table import Table

    from common.pb import admin_pb2 as pb

    cmd = args.admin_command
    resp: Any
    if cmd == "show":
        ref = str(args.version)
        resp = call(
            "GetVersion",
            pb.GetVersionRequest(
                model_name=args.model,
                version=int(ref) if ref.isdigit() else 0,
                tag="" if ref.isdigit() else ref,
            ),
        )
    elif cmd == "rollback":
        resp = call(
            "Rollback",
            pb.RollbackRequest(
                model_name=args.model,
                target_version=args.target,
                reason=args.reason,
                operator=args.operator,
            ),
        )
    elif cmd == "compare":
        resp = call(
            "CompareVersions",
            pb.CompareVersionsRequest(
                model_name=args.model, version_a=args.version_a, version_b=args.version_b
            ),
        )
    elif cmd == "tag":
        resp = call(
            "SetTag",
            pb.SetTagRequest(
                model_name=args.model,
                tag=args.tag,
                version=args.version,
                remove=args.remove,
                operator=args.operator,
            ),
        )
    elif cmd == "alerts":
        resp = call(
            "ListAlerts",
            pb.ListAlertsRequest(model_name=args.model, metric=args.metric, limit=args.limit),
        )
    elif cmd == "trend":
        resp = call(
            "GetTrend",
            pb.GetTrendRequest(model_name=args.model, metric=args.metric, window=args.window),
        )
    else:
        if args.keep < 1:
            print(f"error: --keep must be at least 1, got {args.keep}", file=sys.stderr)
            return 2
        resp = call("PruneVersions", pb.PruneVersionsRequest(model_name=args.model, keep=args.keep))
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    console = Console()
    if cmd == "show":
        table = Table(title=f"{args.model} version {resp.version}", show_header=False)
        for key, value in (
            ("version", resp.version),
            ("parent", resp.parent_version or "-"),
            ("created by", resp.created_by),
            ("round", resp.round_number or "-"),
            ("rollback of", resp.rollback_of or "-"),
            ("tags", ", ".join(resp.tags) or "-"),
            ("sha256", resp.sha256),
            ("description", resp.description),
            *((f"metric {k}", f"{v:.6g}") for k, v in sorted(resp.metrics.items())),
        ):
            table.add_row(key, str(value))
        console.print(table)
    elif cmd == "rollback":
        console.print(
            f"model {args.model}: version {resp.version} is the new head, with the weights of "
            f"version {args.target}"
        )
    elif cmd == "compare":
        table = Table(title=f"{args.model}: version {resp.version_a} -> {resp.version_b}")
        for col in ("metric", f"v{resp.version_a}", f"v{resp.version_b}", "change", "change %"):
            table.add_column(col)
        for key, c in sorted(resp.metric_changes.items()):
            pct = f"{c.change_percent:+.2f}" if c.HasField("change_percent") else "-"
            table.add_row(key, f"{c.v1:.6g}", f"{c.v2:.6g}", f"{c.change:+.6g}", pct)
        console.print(table)
        console.print(
            f"weights: L2 distance {resp.l2_distance:.6g}, cosine similarity "
            f"{resp.cosine_similarity:.6f}"
        )
    elif cmd == "tag":
        verb = "removed from" if args.remove else "now points at"
        console.print(f"model {args.model}: tag {args.tag!r} {verb} version {resp.version}")
    elif cmd == "alerts":
        table = Table(title="performance alerts, newest first")
        for col in ("time", "model", "metric", "kind", "value", "baseline", "message"):
            table.add_column(col, overflow="fold")
        for a in resp.alerts:
            when = datetime.fromtimestamp(a.created_unix_ms / 1000, UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            table.add_row(
                when,
                a.model_name,
                a.metric,
                a.kind,
                f"{a.value:.6g}",
                f"{a.baseline:.6g}",
                a.message,
            )
        console.print(table if resp.alerts else "no alerts")
    elif cmd == "trend":
        console.print(
            f"{args.metric} of {args.model}: [bold]{resp.trend}[/bold] ({resp.direction} is "
            f"better; n {resp.n}, Kendall tau {resp.tau:.3f}, p {resp.p_value:.3g}, Theil-Sen "
            f"slope {resp.slope:.4g} per value, "
            f"95% CI [{resp.slope_low:.4g}, {resp.slope_high:.4g}])"
        )
    else:
        deleted = ", ".join(str(v) for v in resp.deleted) or "none"
        console.print(f"model {args.model}: deleted versions {deleted}")
    return 0


def _privacy_report(report: Any, as_json: bool) -> int:
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console
    from rich.table import Table

    if as_json:
        print(
            json.dumps(
                MessageToDict(
                    report,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                ),
                indent=2,
            )
        )
        return 0
    console = Console()
    if report.entries:
        ledger = Table(title=f"privacy ledger of {report.model_name}")
        for col in ("round", "level", "mechanism", "noise z", "clip", "cohort", "epsilon", "delta"):
            ledger.add_column(col, overflow="fold")
        for e in report.entries:
            ledger.add_row(
                str(e.round_number),
                e.level,
                e.mechanism,
                f"{e.noise_multiplier:.3f}",
                f"{e.clip_norm:g}",
                str(e.cohort),
                f"{e.epsilon:.3f}",
                f"{e.delta:g}",
            )
        console.print(ledger)
        budget = f" of a budget of {report.budget:g}" if report.budget > 0 else ""
        console.print(
            f"user-level privacy of the global model: epsilon {report.epsilon:.3f}{budget} "
            f"at delta {report.delta:g}: [bold]{report.status}[/bold] "
            "(strong <= 1, moderate <= 8, weak above)"
        )
    else:
        # Devices may still train under DP-SGD: their own sample-level spend follows.
        console.print(
            f"model {report.model_name}: no user-level differentially private round yet; "
            "the global model carries no user-level guarantee"
        )
    if report.devices:
        devices = Table(title="per device")
        for col in ("device", "rounds", "user-level epsilon", "sample-level epsilon (DP-SGD)"):
            devices.add_column(col)
        for d in report.devices:
            sample = "-" if d.reported_sample_epsilon < 0 else f"{d.reported_sample_epsilon:.3f}"
            devices.add_row(d.device_id, str(d.rounds), f"{d.epsilon:.3f}", sample)
        console.print(devices)
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _admin_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not args.server:
        print("error: give --server HOST:PORT", file=sys.stderr)
        return 2
    with _admin_channel(args) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                .status
            )
        except grpc.RpcError as err:
            print(f"unhealthy: {err.code().name}: {err.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(name)
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _admin_db(args: argparse.Namespace) -> int:
    from server.store import Store

    if not args.db:
        print("error: `admin db` works on a database: give --db URL", file=sys.stderr)
        return 2
    store = Store(args.db)
    try:
        before = store.schema_revision()
        if args.action == "upgrade":
            store.migrate("head")
            print(f"schema upgraded from {before or 'empty'} to {store.schema_revision()}")
        else:
            print(f"schema revision: {before or 'empty (run: xeno-fl admin --db URL db upgrade)'}")
    finally:
        store.close()
    return 0


def _admin_channel(args: argparse.Namespace) -> Any:
    from common.tls import client_channel

    return client_channel(
        args.server, args.tls_ca, args.tls_cert, args.tls_key, server_name=args.tls_server_name
    )


def _admin_token_value(args: argparse.Namespace) -> str:
    from common.atrest import read_secret

    if args.token is not None:
        _warn_flag_secret("--token", "--token-file or XENO_ADMIN_TOKEN")
        return str(args.token)
    if args.token_file:
        line = read_secret("", args.token_file, "admin token file")
        return line.split()[-1]
    return os.environ.get("XENO_ADMIN_TOKEN", "")


def _warn_flag_secret(flag: str, instead: str) -> None:
    print(
        f"warning: the value of {flag} shows in process listings (ps) of this machine; "
        f"use {instead}",
        file=sys.stderr,
    )


def _write_private(path: Any, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _admin_certs(args: argparse.Namespace) -> int:
    from common import certs

    if args.certs_command in ("revoke", "revoked"):
        return _admin_revoke(args)
    folder = Path(args.dir)
    ca_cert, ca_key = folder / "ca.crt", folder / "ca.key"
    if args.certs_command == "init":
        if ca_cert.exists() or ca_key.exists():
            print(f"error: {folder} already holds a CA; refusing to replace it", file=sys.stderr)
            return 2
        ca = certs.make_ca(days=args.days)
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(ca_key, ca.key_pem)
        ca_cert.write_bytes(ca.cert_pem)
        print(
            f"created the project CA {ca_cert} (give it to servers, devices and admins) and "
            f"its key {ca_key} (owner-only: keep it offline, back it up)"
        )
        return 0
    if not ca_cert.exists() or not ca_key.exists():
        print(
            f"error: no project CA in {folder}; create it with `xeno-fl admin certs init {folder}`",
            file=sys.stderr,
        )
        return 2
    if args.server:
        kind, name = certs.CertKind.SERVER, args.server
    elif args.device:
        kind, name = certs.CertKind.DEVICE, args.device
    else:
        kind, name = certs.CertKind.ADMIN, args.admin
    role = None
    if kind is certs.CertKind.ADMIN:
        if not args.role:
            print("error: an admin certificate needs --role viewer|operator|admin", file=sys.stderr)
            return 2
        role = certs.parse_role(args.role)
    elif args.role:
        print("error: --role is for admin certificates only", file=sys.stderr)
        return 2
    from common.atrest import check_private_file

    check_private_file(ca_key, "CA key")
    ca = certs.Issued(ca_cert.read_bytes(), ca_key.read_bytes())
    issued = certs.issue(ca, kind, name, role=role, days=args.days)
    stem = f"{kind.value}-{name.split(',')[0]}"
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    if cert_path.exists() or key_path.exists():
        print(f"error: {cert_path} exists; remove it first to issue again", file=sys.stderr)
        return 2
    _write_private(key_path, issued.key_pem)
    cert_path.write_bytes(issued.cert_pem)
    serial = certs.serial_hex(certs.load_certificate(issued.cert_pem))
    print(
        f"issued {cert_path} and {key_path} (owner-only), valid {args.days} days, serial {serial}"
    )
    return 0


def _admin_revoke(args: argparse.Namespace) -> int:
    from common import certs
    from common.pb import admin_pb2 as pb

    if bool(args.server) == bool(args.db):
        print("error: give exactly one of --server HOST:PORT or --db URL", file=sys.stderr)
        return 2
    call = _admin_caller(args)
    if args.certs_command == "revoked":
        listed = call("ListRevokedCertificates", pb.ListRevokedCertificatesRequest()).revoked
        rows = [
            {
                "serial": r.serial,
                "kind": r.kind,
                "name": r.name,
                "reason": r.reason,
                "revoked_at_ms": r.revoked_at_ms,
            }
            for r in listed
        ]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                who = f"serial {r['serial']}" if r["serial"] else f"every {r['kind']} {r['name']}"
                print(f"{who}  {r['reason']}")
        return 0
    serial = args.serial
    if args.cert:
        from common.tls import read_pem

        try:
            serial = certs.serial_hex(certs.load_certificate(read_pem(args.cert, "certificate")))
        except certs.CertError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    given = [x for x in (serial, args.device, args.admin) if x]
    if len(given) != 1:
        print(
            "error: revoke one thing: a SERIAL, --cert FILE, --device NAME or --admin NAME",
            file=sys.stderr,
        )
        return 2
    r = call(
        "RevokeCertificate",
        pb.RevokeCertificateRequest(
            serial=serial, device_name=args.device, admin_name=args.admin, reason=args.reason
        ),
    )
    who = f"certificate serial {r.serial}" if r.serial else f"every {r.kind} certificate {r.name}"
    print(
        f"revoked {who}"
        + ("" if r.serial else " issued until now (one issued later is accepted)")
        + (
            "; the server refuses it now"
            if args.server
            else "; a running server refuses it within its --revocation-refresh (5 s)"
        )
    )
    return 0


def _admin_audit(args: argparse.Namespace) -> int:
    from datetime import UTC

    from rich.console import Console
    from rich.table import Table

    from server.store import Store, audit_entries, audit_head
    from server.store.audit import Entry, verify

    if bool(args.server) == bool(args.db):
        print("error: give exactly one of --server HOST:PORT or --db URL", file=sys.stderr)
        return 2
    if args.server:
        # The entries come over the Admin API (role admin); the chain is verified here,
        # not by the server, so a verdict does not rest on the server's own word.
        from datetime import datetime

        from common.pb import admin_pb2 as pb

        listed = _admin_caller(args)("ListAuditLog", pb.ListAuditLogRequest())
        entries = [
            Entry(
                e.seq,
                datetime.fromisoformat(e.time_iso),
                e.actor,
                e.action,
                e.target,
                json.loads(e.details_json),
                e.prev_hash,
                e.hash,
            )
            for e in listed.entries
        ]
        head = (int(listed.head_seq), listed.head_hash) if listed.head_hash else None
    else:
        store = Store(args.db)
        try:
            if store.schema_revision() is None:
                print(
                    f"error: {args.db} has no schema; is it the server's database?",
                    file=sys.stderr,
                )
                return 2
            entries = audit_entries(store)
            head = audit_head(store)
        finally:
            store.close()
    if args.audit_command == "list":
        shown = entries[-args.limit :] if args.limit > 0 else entries
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "seq": e.seq,
                            "time": e.created_at.isoformat(),
                            "actor": e.actor,
                            "action": e.action,
                            "target": e.target,
                            "details": e.details,
                            "hash": e.hash,
                        }
                        for e in shown
                    ],
                    indent=1,
                )
            )
            return 0
        table = Table(title="audit log, oldest first")
        for col in ("seq", "time (UTC)", "actor", "action", "target", "details", "hash"):
            table.add_column(col, overflow="fold")
        for e in shown:
            moment = e.created_at if e.created_at.tzinfo else e.created_at.replace(tzinfo=UTC)
            table.add_row(
                str(e.seq),
                f"{moment:%Y-%m-%d %H:%M:%S}",
                e.actor,
                e.action,
                e.target,
                json.dumps(e.details, sort_keys=True),
                e.hash[:16],
            )
        Console().print(table)
        return 0
    verdict = verify(entries, head, args.head)
    if verdict.ok:
        print(
            f"audit log intact: {verdict.rows} rows, head {verdict.head}\n"
            "save the head elsewhere; `xeno-fl admin audit verify --head HEAD` later "
            "proves nothing before it was rewritten"
        )
        return 0
    where = f" at row {verdict.first_bad}" if verdict.first_bad is not None else ""
    print(
        f"audit log BROKEN{where}: {verdict.problem}.\n"
        "Nothing was changed. Next: inspect the rows around it with `xeno-fl admin --db URL "
        "audit list`, and compare the database with a backup taken before that row's time.",
        file=sys.stderr,
    )
    return 1


def _db_key_file(db: str, key_file: str) -> str:
    """The data key file for a database read directly: given, else the server's default."""
    if key_file:
        return key_file
    from server.app import _data_dir

    default = os.path.join(_data_dir(db), "xeno.key")
    return default if os.path.exists(default) else ""


def _db_sealer(db: str) -> Any:
    """The server's data key for --db access (None when none is found: sealed rows refuse)."""
    from common.atrest import Sealer, check_private_file, load_key

    key_file = _db_key_file(db, os.environ.get("XENO_DATA_KEY_FILE", ""))
    if not os.environ.get("XENO_DATA_KEY") and not key_file:
        return None
    if key_file and not os.environ.get("XENO_DATA_KEY"):
        check_private_file(key_file, "data key file")
    return Sealer(load_key(key_file, "XENO_DATA_KEY"))


def _admin_rotate_key(args: argparse.Namespace) -> int:
    from common.atrest import DataKeyError, check_private_file, load_key, parse_key
    from server.store.lock import DatabaseInUseError
    from server.store.rotation import rotate

    if not args.db:
        print("error: rotate-key works on the database, offline: give --db URL", file=sys.stderr)
        return 2
    try:
        old_file = _db_key_file(args.db, args.key_file)
        if old_file and not os.environ.get("XENO_DATA_KEY"):
            check_private_file(old_file, "data key file")
        old = load_key(old_file, "XENO_DATA_KEY")
        check_private_file(args.new_key_file, "new data key file")
        new = parse_key(Path(args.new_key_file).read_text())
        report = rotate(
            args.db,
            old,
            new,
            batch=args.batch,
            progress=lambda what, n: print(f"{what}: {n} re-sealed", flush=True),
        )
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} does not exist", file=sys.stderr)
        return 2
    except (DataKeyError, DatabaseInUseError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report.already_done:
        print(f"the database is already under key id {report.new_key_id}; nothing to do")
        return 0
    print(
        f"{'finished the interrupted' if report.resumed else 'done:'} rotation from key id "
        f"{report.old_key_id} to key id {report.new_key_id} ({report.blobs} blobs, "
        f"{report.versions} versions, {report.participants} participant rows, "
        f"{report.ab_results} A/B result pseudonyms this run).\n"
        f"Start the server with --data-key-file {args.new_key_file}; the old key opens "
        "nothing in this database any more (keep it only for backups made before now)."
    )
    return 0


def _admin_token(args: argparse.Namespace) -> int:
    from common.certs import parse_role
    from server.security import add_admin_token

    token = add_admin_token(args.file, args.name, parse_role(args.role))
    if args.out:
        _write_private(args.out, (token + "\n").encode())
        print(f"added {args.name} ({args.role}) to {args.file}; its token is in {args.out}")
    else:
        print(f"added {args.name} ({args.role}) to {args.file}; give the admin its token line")
    return 0


def _admin_caller(args: argparse.Namespace) -> Any:
    import grpc

    if args.server:
        from common.pb import admin_pb2_grpc

        channel = _admin_channel(args)
        stub = admin_pb2_grpc.AdminStub(channel)
        token = _admin_token_value(args)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()

        def remote(method: str, request: Any) -> Any:
            try:
                return getattr(stub, method)(request, metadata=metadata, timeout=30)
            except grpc.RpcError as err:
                raise SystemExit(f"error: {err.code().name}: {err.details()}") from None

        return remote

    from server.services.admin import AdminServicer
    from server.store import Store
    from server.store.audit import set_actor

    set_actor(f"admin {os.environ.get('USER', 'unknown')} (direct database access)")
    servicer = AdminServicer(Store(args.db, _db_sealer(args.db)))

    class _Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise SystemExit(f"error: {details}")

    def local(method: str, request: Any) -> Any:
        return getattr(servicer, method)(request, _Context())

    return local


if __name__ == "__main__":
    sys.exit(main())


def _user(args: argparse.Namespace) -> int:
    from client.assistant import consent
    from client.assistant.store import StoreError, UserStore
    from xeno.model_finetuning import delete_user_data, export_user_data

    try:
        if args.user_command == "export":
            archive = export_user_data(args.user_id, path=args.out, home=args.home)
            if args.out is None:
                print(json.dumps(archive, indent=1, ensure_ascii=False))
            else:
                print(f"wrote {args.out}")
            return 0
        if args.user_command == "delete":
            if not args.yes:
                print("error: deleting is final; add --yes to confirm", file=sys.stderr)
                return 2
            result = delete_user_data(
                args.user_id, home=args.home, server=args.server, device_state_dir=args.state_dir
            )
            print(json.dumps(result))
            if "error" in result.get("server", {}):
                print(
                    f"error: the server did not erase: {result['server']['error']}", file=sys.stderr
                )
                return 1
            return 0
        with UserStore(args.user_id, home=args.home) as store:
            if args.user_command == "consent":
                if args.grant and args.revoke:
                    print("error: --grant or --revoke, not both", file=sys.stderr)
                    return 2
                if args.grant:
                    consent.record(store, args.grant, True)
                if args.revoke:
                    consent.record(store, args.revoke, False)
                print(json.dumps(consent.consent_history(store)))
                return 0
            if args.days is not None:
                store.set_retention_days(args.days)
            print(json.dumps({"retention_days": store.retention_days()}))
            return 0
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
