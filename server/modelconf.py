"""Per-model settings of a server that trains several models, and the models file.

`ModelSettings` is everything that may differ between the models one server
trains: the task (so the spec and the evaluation data), the strategy, the
round settings, secure aggregation, the DP policy and retention. `xeno-fl
server`'s flags give the default model's settings and the defaults of every
model in the models file (`--models models.toml`):

    [models.intents-fasttext]
    task = "intents"
    strategy = "fedadam"
    rounds = 50
    dp = "distributed"
    dp_target_epsilon = 8.0

Keys are the server flags' names with `_` (or `-`); a value has the flag's
type. Each refusal names the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.modelspec import ModelSpec
from common.tasks import TaskName, model_spec_for
from server.privacy import UserDpMechanism, UserDpPolicy, noise_for_target
from server.rounds import RoundConfig, check_strategy
from server.strategies import FitInstructions, Strategy, make_strategy

__all__ = [
    "MODEL_KEYS",
    "MODEL_NAME",
    "ModelSettings",
    "ModelTable",
    "ModelsFileError",
    "check_model_name",
    "parse_model_table",
    "parse_models_file",
    "parse_models_text",
    "parse_settings",
]

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelSettings:
    """How one federated model is trained; field names and defaults are the server flags'."""

    task: str = "digits"
    hidden: str = "64"
    params: int = 0
    seed: int = 0
    strategy: str = "fedavg"
    trim_fraction: float = 0.1
    byzantine: int = 1
    multi_krum_m: int = 0
    update_clip_norm: float = 0.0
    server_lr: float | None = None
    proximal_mu: float = 0.01
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.05
    momentum: float = 0.9
    local_optimizer: str = "sgd"
    personalization: str = "none"
    personal_epochs: int = 5
    personal_learning_rate: float = 0.5
    min_clients: int = 2
    clients_per_round: int = 10
    overselect: float = 0.0
    round_deadline: float = 60.0
    max_examples_weight: int = 1_000_000
    selection_window: float = 2.0
    rounds: int = 0
    staging_buffers: int = 4
    secagg: bool = True
    secagg_clip_norm: float = 10.0
    secagg_max_weight: int = 1000
    secagg_phase_timeout: float = 10.0
    secagg_dropout: float = 0.1
    secagg_degree: int = 0
    secagg_threshold: int = 0
    secagg_corrupt_fraction: float = 0.05
    dp: str = "none"
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_clip_norm: float = 1.0
    dp_min_contributors: int = 0
    dp_delta: float = 1e-5
    dp_adaptive_quantile: float = 0.0
    dp_clip_lr: float = 0.2
    dp_clip_count_noise: float = 0.0
    privacy_budget: float = 0.0
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 0.0
    dp_sgd_target_epsilon: float = 0.0
    dp_sgd_max_grad_norm: float = 1.0
    dp_sgd_delta: float = 1e-5
    eval_data: str = "auto"
    data_seed: int = 0
    test_fraction: float = 0.2
    keep_versions: int = 1000
    keep_every: int = 100
    eval_every: int = 0
    eval_max_examples: int = 1000
    store_retry: float = 3.0
    stall_grace: float = 30.0

    def task_name(self) -> TaskName:
        return TaskName.parse(self.task)

    def model_spec(self) -> ModelSpec:
        hidden = [int(h) for h in self.hidden.split(",") if h.strip()]
        return model_spec_for(self.task_name(), hidden, self.params)

    def fit_instructions(self) -> FitInstructions:
        extra: dict[str, str] = {}
        if self.personalization != "none":
            # FitConfig.extra keys the devices read (client.personal; docs/protocol.md).
            extra = {
                "personalization": self.personalization,
                "personal_epochs": str(self.personal_epochs),
                "personal_learning_rate": repr(self.personal_learning_rate),
            }
        if self.local_optimizer != "sgd":
            extra["local_optimizer"] = self.local_optimizer  # client.training.LOCAL_OPTIMIZER_KEY
        return FitInstructions(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            extra=extra,
        )

    def make_strategy(self) -> Strategy:
        return make_strategy(
            self.strategy,
            self.fit_instructions(),
            self.server_lr,
            self.proximal_mu,
            trim_fraction=self.trim_fraction,
            byzantine=self.byzantine,
            multi_krum_m=self.multi_krum_m,
        )

    def round_config(self) -> RoundConfig:
        return RoundConfig(
            min_clients=self.min_clients,
            clients_per_round=self.clients_per_round,
            overselect=self.overselect,
            round_deadline_s=self.round_deadline,
            max_examples_weight=self.max_examples_weight,
            selection_window_s=self.selection_window,
            rounds=self.rounds,
            staging_buffers=self.staging_buffers,
            update_clip_norm=self.update_clip_norm,
            secagg=self.secagg,
            secagg_clip_norm=self.secagg_clip_norm,
            secagg_max_weight=self.secagg_max_weight,
            secagg_phase_timeout_s=self.secagg_phase_timeout,
            secagg_dropout=self.secagg_dropout,
            secagg_degree=self.secagg_degree,
            secagg_threshold=self.secagg_threshold,
            secagg_corrupt_fraction=self.secagg_corrupt_fraction,
            user_dp=self.user_dp_policy(),
            dp_sgd=self.dp_sgd,
            dp_sgd_noise_multiplier=self.dp_sgd_noise_multiplier,
            dp_sgd_max_grad_norm=self.dp_sgd_max_grad_norm,
            dp_sgd_target_epsilon=self.dp_sgd_target_epsilon,
            dp_sgd_delta=self.dp_sgd_delta,
            store_retry_s=self.store_retry,
            keep_versions=self.keep_versions,
            keep_every=self.keep_every,
            stall_grace_s=self.stall_grace,
            eval_every=self.eval_every,
            eval_max_examples=self.eval_max_examples,
        )

    def user_dp_policy(self) -> UserDpPolicy | None:
        try:
            mechanism = UserDpMechanism(self.dp)
        except ValueError:
            raise ValueError(
                f"unknown --dp {self.dp!r}; use distributed, central or none"
            ) from None
        if mechanism is UserDpMechanism.NONE:
            if self.privacy_budget > 0:
                raise ValueError("--privacy-budget needs user-level DP (--dp distributed|central)")
            return None
        min_contributors = self.dp_min_contributors or self.min_clients
        z = self.dp_noise_multiplier
        if z <= 0:
            if self.dp_target_epsilon <= 0:
                raise ValueError("--dp needs --dp-noise-multiplier or --dp-target-epsilon")
            z = noise_for_target(
                mechanism,
                self.dp_target_epsilon,
                self.rounds,
                self.dp_delta,
                self.dp_clip_norm,
                math.ceil(self.clients_per_round * (1 + self.overselect)),
                min_contributors,
                _num_parameters(self.model_spec()),
            )
        count_noise = self.dp_clip_count_noise
        if self.dp_adaptive_quantile > 0 and count_noise <= 0:
            count_noise = max(self.clients_per_round / 20, z)
        return UserDpPolicy(
            mechanism,
            z,
            self.dp_clip_norm,
            min_contributors,
            self.dp_delta,
            self.privacy_budget,
            target_quantile=self.dp_adaptive_quantile,
            clip_lr=self.dp_clip_lr,
            count_noise=count_noise,
        )

    def validate(self) -> None:
        """Raise ValueError when these settings cannot train a model (nothing is created)."""
        self.task_name()
        if self.eval_data not in ("auto", "none", self.task):
            raise ValueError(f"unknown eval_data {self.eval_data!r}; use auto or none")
        if self.personalization not in ("none", "fedrep"):
            raise ValueError(
                f"unknown personalization {self.personalization!r}; use fedrep or none"
            )
        if self.local_optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown local_optimizer {self.local_optimizer!r}; use sgd or adam")
        if not 1 <= self.personal_epochs <= 100:
            raise ValueError(f"personal_epochs must be in 1..100, got {self.personal_epochs}")
        if not 0 < self.personal_learning_rate <= 100:
            raise ValueError(
                f"personal_learning_rate must be in (0, 100], got {self.personal_learning_rate}"
            )
        self.model_spec()
        check_strategy(self.make_strategy(), self.round_config())

    def to_json(self) -> dict[str, Any]:
        """Every setting, as stored with the model's definition."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelSettings:
        """Stored settings; keys of a newer or older release that this one lacks are dropped."""
        return cls(**{k: v for k, v in values.items() if k in MODEL_KEYS})


MODEL_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelSettings))
_TYPES: dict[str, Any] = typing.get_type_hints(ModelSettings)
# Table keys that are not settings: whether a model starts paused when it is created.
_EXTRA_KEYS = ("paused",)


def _num_parameters(spec: ModelSpec) -> int:
    from common.models import build_model, num_parameters  # torch: only when DP derives noise

    return num_parameters(build_model(spec))


def check_model_name(name: str) -> str:
    """The name, or ValueError: 1-128 of letters, digits, '.', '_', '-', not starting with . _ -."""
    if not MODEL_NAME.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class ModelsFileError(ValueError):
    """A models file (or a model's settings) that cannot be used; says where and why."""


@dataclass(frozen=True)
class ModelTable:
    """One model of a models file: its settings and whether it starts paused."""

    name: str
    settings: ModelSettings
    paused: bool = False
    line: int = 0


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp == float | None:
        return "a number"
    return "a string"


def _coerce(key: str, value: Any) -> Any:
    """The value in the key's type, or ValueError naming the expected type."""
    tp = _TYPES[key]
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float or tp == float | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{key} must be {_type_name(tp)}, got {value!r}")
    return value


def _line_of(lines: list[str], start: int, end: int, key: str) -> int:
    """1-based line of `key = ...` between lines start and end (0-based), else start + 1."""
    pattern = re.compile(rf"^\s*(?:\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=")
    for number in range(start, end):
        if pattern.match(lines[number]):
            return number + 1
    return start + 1


def _header_lines(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Model name -> (0-based line of its [models.NAME] header, line of the next header)."""
    header = re.compile(r"^\s*\[\s*models\s*\.\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9._-]+))\s*\]")
    starts: list[tuple[str, int]] = []
    others: list[int] = []
    for number, line in enumerate(lines):
        m = header.match(line)
        if m:
            starts.append((m.group(1) or m.group(2) or m.group(3), number))
        elif line.lstrip().startswith("["):
            others.append(number)
    out: dict[str, tuple[int, int]] = {}
    bounds = [*sorted([n for _, n in starts] + others), len(lines)]
    for name, number in starts:
        end = next(b for b in bounds if b > number)
        out[name] = (number, end)
    return out


def parse_model_table(
    name: str,
    table: Mapping[str, Any],
    base: ModelSettings,
    where: str,
    lines: list[str] | None = None,
    span: tuple[int, int] = (0, 0),
    header: bool = False,
) -> ModelTable:
    """One model's settings: base overridden by the table's keys; ModelsFileError on a bad one.

    `where` prefixes each message (e.g. "models.toml" or "settings"), with the line of
    the offending key when the source text (`lines`, the table's `span`) is known; a
    refusal that names no key points at the table's header line if it has one.
    """
    lines = lines or []

    def fail(key: str, message: str) -> ModelsFileError:
        line = 0
        if lines and key:
            line = _line_of(lines, span[0], span[1], key)
        elif header:
            line = span[0] + 1
        at = f"{where}:{line}" if line else where
        return ModelsFileError(f"{at}: model {name!r}: {message}")

    try:
        check_model_name(name)
    except ValueError as exc:
        raise fail("", str(exc)) from None
    values: dict[str, Any] = {}
    paused = False
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key == "paused":
            if not isinstance(value, bool):
                raise fail(raw_key, f"paused must be a boolean (true/false), got {value!r}")
            paused = value
            continue
        if key not in _TYPES:
            close = difflib.get_close_matches(key, [*MODEL_KEYS, *_EXTRA_KEYS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(raw_key, f"unknown key {raw_key!r}{hint}")
        try:
            values[key] = _coerce(key, value)
        except ValueError as exc:
            raise fail(raw_key, str(exc)) from None
    settings = dataclasses.replace(base, **values)
    try:
        settings.validate()
    except (ValueError, TypeError) as exc:
        raise fail("", str(exc)) from None
    line = span[0] + 1 if header else 0
    return ModelTable(name, settings, paused, line)


def parse_models_text(text: str, base: ModelSettings, where: str) -> list[ModelTable]:
    """The models of a models file's text, in file order; ModelsFileError names line and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"{where}: not valid TOML: {exc}") from None
    lines = text.splitlines()
    spans = _header_lines(lines)
    unknown = [k for k in data if k != "models"]
    if unknown:
        raise ModelsFileError(
            f"{where}: unknown top-level key {unknown[0]!r}: models are tables [models.NAME]"
        )
    models = data.get("models", {})
    if not isinstance(models, dict) or not models:
        raise ModelsFileError(f"{where}: no models: add a table [models.NAME] per model")
    out = []
    for name, table in models.items():
        span = spans.get(name, (0, len(lines)))
        if not isinstance(table, dict):
            raise ModelsFileError(
                f"{where}:{span[0] + 1}: models.{name} must be a table [models.{name}]"
            )
        out.append(parse_model_table(name, table, base, where, lines, span, header=True))
    return out


def parse_models_file(path: str, base: ModelSettings) -> list[ModelTable]:
    """The models of the file at path (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ModelsFileError(f"{path}: cannot read the models file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelsFileError(f"{path}: the models file is not UTF-8 text") from None
    return parse_models_text(text, base, path)


def parse_settings(name: str, text: str, base: ModelSettings) -> ModelTable:
    """One model's settings from TOML `key = value` lines (the body of its table)."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"settings: not valid TOML: {exc}") from None
    lines = text.splitlines()
    for key, value in table.items():
        if isinstance(value, dict):
            line = _line_of(lines, 0, len(lines), key)
            raise ModelsFileError(
                f"settings:{line}: model {name!r}: {key!r} must be a value, not a table"
            )
    return parse_model_table(name, table, base, "settings", lines, (0, len(lines)))
