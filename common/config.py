"""Typed configuration: one dataclass per process, mapped onto CLI flags and env vars.

Each field declares its help text and environment variable with `setting()`.
`add_arguments` turns a config class into argparse flags whose help shows
the variable and the default; `from_namespace` builds the config with the
precedence flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["add_arguments", "from_namespace", "setting"]


def setting(default: Any, help: str, env: str | None = None, flag: str | None = None) -> Any:
    """A config field with its help text, optional env var and optional flag name."""
    meta = {"help": help, "env": env, "flag": flag}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("flag") or "--" + field.name.replace("_", "-"))


def _base_type(tp: Any) -> Any:
    """Int for `int`, str for `str | None`, bool for `bool`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse(tp: Any, raw: str) -> Any:
    if tp is bool:
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    return tp(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per field of the dataclass cls to parser."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue
        tp = _base_type(hints[field.name])
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc,operator]
        )
        env = field.metadata.get("env")
        extra = f" [env {env}]" if env else ""
        help_text = f"{field.metadata['help']} (default: {default}){extra}"
        flag = _flag(field)
        if tp is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=field.name,
                type=tp,
                default=None,
                help=help_text,
                metavar=field.name.upper(),
            )


def from_namespace(
    cls: type[T], ns: argparse.Namespace, environ: Mapping[str, str] | None = None, **overrides: Any
) -> T:
    """Build cls from parsed flags, then env vars, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in overrides:
            values[field.name] = overrides[field.name]
            continue
        value = getattr(ns, field.name, None)
        env = field.metadata.get("env")
        if value is None and env and env in environ:
            try:
                value = _parse(_base_type(hints[field.name]), environ[env])
            except ValueError as exc:
                raise SystemExit(f"error: environment variable {env}: {exc}") from exc
        if value is not None:
            values[field.name] = value
    return cls(**values)
