from common.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfo(_message.Message):
    __slots__ = ("name", "current_version", "spec", "num_parameters", "strategy", "created_unix_ms", "task", "training", "paused", "settings_json", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    spec: _tensor_pb2.ModelSpec
    num_parameters: int
    strategy: str
    created_unix_ms: int
    task: str
    training: bool
    paused: bool
    settings_json: str
    source: str
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., spec: _Optional[_Union[_tensor_pb2.ModelSpec, _Mapping]] = ..., num_parameters: _Optional[int] = ..., strategy: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., task: _Optional[str] = ..., training: _Optional[bool] = ..., paused: _Optional[bool] = ..., settings_json: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "settings_toml", "paused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_TOML_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    settings_toml: str
    paused: bool
    def __init__(self, name: _Optional[str] = ..., settings_toml: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class PauseModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResumeModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EvaluateModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class EvaluateModelResponse(_message.Message):
    __slots__ = ("name", "version", "queued")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    queued: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., queued: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "sha256", "parent_version", "round_id", "created_unix_ms", "metrics", "description", "created_by", "tags", "round_number", "rollback_of")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_OF_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    parent_version: int
    round_id: str
    created_unix_ms: int
    metrics: _containers.ScalarMap[str, float]
    description: str
    created_by: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    round_number: int
    rollback_of: int
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ..., parent_version: _Optional[int] = ..., round_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., description: _Optional[str] = ..., created_by: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., round_number: _Optional[int] = ..., rollback_of: _Optional[int] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round_id", "number", "status", "base_version", "result_version", "selected", "participants", "dropouts", "bytes_in", "bytes_out", "seconds", "metrics", "failure_reason", "started_unix_ms")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DROPOUTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    number: int
    status: str
    base_version: int
    result_version: int
    selected: int
    participants: int
    dropouts: int
    bytes_in: int
    bytes_out: int
    seconds: float
    metrics: _containers.ScalarMap[str, float]
    failure_reason: str
    started_unix_ms: int
    def __init__(self, round_id: _Optional[str] = ..., number: _Optional[int] = ..., status: _Optional[str] = ..., base_version: _Optional[int] = ..., result_version: _Optional[int] = ..., selected: _Optional[int] = ..., participants: _Optional[int] = ..., dropouts: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., failure_reason: _Optional[str] = ..., started_unix_ms: _Optional[int] = ...) -> None: ...

class GetRoundHistoryRequest(_message.Message):
    __slots__ = ("model_name", "limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    limit: int
    def __init__(self, model_name: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class GetRoundHistoryResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class GetPrivacyReportRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class PrivacyLedgerEntry(_message.Message):
    __slots__ = ("round_id", "round_number", "level", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "cohort", "epsilon", "delta", "created_unix_ms")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    round_number: int
    level: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    cohort: int
    epsilon: float
    delta: float
    created_unix_ms: int
    def __init__(self, round_id: _Optional[str] = ..., round_number: _Optional[int] = ..., level: _Optional[str] = ..., mechanism: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., clip_norm: _Optional[float] = ..., cohort: _Optional[int] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class DevicePrivacySummary(_message.Message):
    __slots__ = ("device_id", "rounds", "epsilon", "reported_sample_epsilon")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    REPORTED_SAMPLE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    rounds: int
    epsilon: float
    reported_sample_epsilon: float
    def __init__(self, device_id: _Optional[str] = ..., rounds: _Optional[int] = ..., epsilon: _Optional[float] = ..., reported_sample_epsilon: _Optional[float] = ...) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("model_name", "entries", "epsilon", "delta", "status", "budget", "devices")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    entries: _containers.RepeatedCompositeFieldContainer[PrivacyLedgerEntry]
    epsilon: float
    delta: float
    status: str
    budget: float
    devices: _containers.RepeatedCompositeFieldContainer[DevicePrivacySummary]
    def __init__(self, model_name: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[PrivacyLedgerEntry, _Mapping]]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., status: _Optional[str] = ..., budget: _Optional[float] = ..., devices: _Optional[_Iterable[_Union[DevicePrivacySummary, _Mapping]]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("model_name", "version", "tag")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    tag: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model_name", "target_version", "reason", "operator")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    target_version: int
    reason: str
    operator: str
    def __init__(self, model_name: _Optional[str] = ..., target_version: _Optional[int] = ..., reason: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class CompareVersionsRequest(_message.Message):
    __slots__ = ("model_name", "version_a", "version_b")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_A_FIELD_NUMBER: _ClassVar[int]
    VERSION_B_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version_a: int
    version_b: int
    def __init__(self, model_name: _Optional[str] = ..., version_a: _Optional[int] = ..., version_b: _Optional[int] = ...) -> None: ...

class MetricChange(_message.Message):
    __slots__ = ("v1", "v2", "change", "change_percent")
    V1_FIELD_NUMBER: _ClassVar[int]
    V2_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    v1: float
    v2: float
    change: float
    change_percent: float
    def __init__(self, v1: _Optional[float] = ..., v2: _Optional[float] = ..., change: _Optional[float] = ..., change_percent: _Optional[float] = ...) -> None: ...

class CompareVersionsResponse(_message.Message):
    __slots__ = ("version_a", "version_b", "metric_changes", "only_in_a", "only_in_b", "l2_distance", "cosine_similarity")
    class MetricChangesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetricChange
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetricChange, _Mapping]] = ...) -> None: ...
    VERSION_A_FIELD_NUMBER: _ClassVar[int]
    VERSION_B_FIELD_NUMBER: _ClassVar[int]
    METRIC_CHANGES_FIELD_NUMBER: _ClassVar[int]
    ONLY_IN_A_FIELD_NUMBER: _ClassVar[int]
    ONLY_IN_B_FIELD_NUMBER: _ClassVar[int]
    L2_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    COSINE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    version_a: int
    version_b: int
    metric_changes: _containers.MessageMap[str, MetricChange]
    only_in_a: _containers.RepeatedScalarFieldContainer[str]
    only_in_b: _containers.RepeatedScalarFieldContainer[str]
    l2_distance: float
    cosine_similarity: float
    def __init__(self, version_a: _Optional[int] = ..., version_b: _Optional[int] = ..., metric_changes: _Optional[_Mapping[str, MetricChange]] = ..., only_in_a: _Optional[_Iterable[str]] = ..., only_in_b: _Optional[_Iterable[str]] = ..., l2_distance: _Optional[float] = ..., cosine_similarity: _Optional[float] = ...) -> None: ...

class SetTagRequest(_message.Message):
    __slots__ = ("model_name", "tag", "version", "remove", "operator")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    tag: str
    version: int
    remove: bool
    operator: str
    def __init__(self, model_name: _Optional[str] = ..., tag: _Optional[str] = ..., version: _Optional[int] = ..., remove: _Optional[bool] = ..., operator: _Optional[str] = ...) -> None: ...

class SetTagResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PruneVersionsRequest(_message.Message):
    __slots__ = ("model_name", "keep")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    keep: int
    def __init__(self, model_name: _Optional[str] = ..., keep: _Optional[int] = ...) -> None: ...

class PruneVersionsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deleted: _Optional[_Iterable[int]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("model_name", "metric", "limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    metric: str
    limit: int
    def __init__(self, model_name: _Optional[str] = ..., metric: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AlertInfo(_message.Message):
    __slots__ = ("model_name", "metric", "kind", "value", "baseline", "message", "created_unix_ms")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    metric: str
    kind: str
    value: float
    baseline: float
    message: str
    created_unix_ms: int
    def __init__(self, model_name: _Optional[str] = ..., metric: _Optional[str] = ..., kind: _Optional[str] = ..., value: _Optional[float] = ..., baseline: _Optional[float] = ..., message: _Optional[str] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[AlertInfo]
    def __init__(self, alerts: _Optional[_Iterable[_Union[AlertInfo, _Mapping]]] = ...) -> None: ...

class GetTrendRequest(_message.Message):
    __slots__ = ("model_name", "metric", "window")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    metric: str
    window: int
    def __init__(self, model_name: _Optional[str] = ..., metric: _Optional[str] = ..., window: _Optional[int] = ...) -> None: ...

class TrendInfo(_message.Message):
    __slots__ = ("trend", "direction", "n", "tau", "p_value", "slope", "slope_low", "slope_high")
    TREND_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SLOPE_FIELD_NUMBER: _ClassVar[int]
    SLOPE_LOW_FIELD_NUMBER: _ClassVar[int]
    SLOPE_HIGH_FIELD_NUMBER: _ClassVar[int]
    trend: str
    direction: str
    n: int
    tau: float
    p_value: float
    slope: float
    slope_low: float
    slope_high: float
    def __init__(self, trend: _Optional[str] = ..., direction: _Optional[str] = ..., n: _Optional[int] = ..., tau: _Optional[float] = ..., p_value: _Optional[float] = ..., slope: _Optional[float] = ..., slope_low: _Optional[float] = ..., slope_high: _Optional[float] = ...) -> None: ...

class AbArm(_message.Message):
    __slots__ = ("model_name", "version", "reference")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    reference: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., reference: _Optional[str] = ...) -> None: ...

class AbTestInfo(_message.Message):
    __slots__ = ("name", "status", "traffic_split", "metrics", "variant_a", "variant_b", "winner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SPLIT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_A_FIELD_NUMBER: _ClassVar[int]
    VARIANT_B_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    traffic_split: float
    metrics: _containers.RepeatedScalarFieldContainer[str]
    variant_a: AbArm
    variant_b: AbArm
    winner: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., traffic_split: _Optional[float] = ..., metrics: _Optional[_Iterable[str]] = ..., variant_a: _Optional[_Union[AbArm, _Mapping]] = ..., variant_b: _Optional[_Union[AbArm, _Mapping]] = ..., winner: _Optional[str] = ...) -> None: ...

class CreateAbTestRequest(_message.Message):
    __slots__ = ("name", "model_a", "model_b", "traffic_split", "metrics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SPLIT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_a: str
    model_b: str
    traffic_split: float
    metrics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., model_a: _Optional[str] = ..., model_b: _Optional[str] = ..., traffic_split: _Optional[float] = ..., metrics: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAbTestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAbTestsResponse(_message.Message):
    __slots__ = ("tests",)
    TESTS_FIELD_NUMBER: _ClassVar[int]
    tests: _containers.RepeatedCompositeFieldContainer[AbTestInfo]
    def __init__(self, tests: _Optional[_Iterable[_Union[AbTestInfo, _Mapping]]] = ...) -> None: ...

class AssignVariantRequest(_message.Message):
    __slots__ = ("test_name", "user_id")
    TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    test_name: str
    user_id: str
    def __init__(self, test_name: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class AssignVariantResponse(_message.Message):
    __slots__ = ("variant", "arm")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    variant: str
    arm: AbArm
    def __init__(self, variant: _Optional[str] = ..., arm: _Optional[_Union[AbArm, _Mapping]] = ...) -> None: ...

class RecordAbResultRequest(_message.Message):
    __slots__ = ("test_name", "variant", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    test_name: str
    variant: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, test_name: _Optional[str] = ..., variant: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RecordAbResultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AnalyzeAbTestRequest(_message.Message):
    __slots__ = ("test_name", "method")
    TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    test_name: str
    method: str
    def __init__(self, test_name: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class AbMetricAnalysis(_message.Message):
    __slots__ = ("variant_a_mean", "variant_b_mean", "difference", "percent_change", "winner", "count_a", "count_b", "ci_low", "ci_high", "p_value", "direction", "sequential_p_value", "sequential_ci_low", "sequential_ci_high")
    VARIANT_A_MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANT_B_MEAN_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_CHANGE_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    COUNT_A_FIELD_NUMBER: _ClassVar[int]
    COUNT_B_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    variant_a_mean: float
    variant_b_mean: float
    difference: float
    percent_change: float
    winner: str
    count_a: int
    count_b: int
    ci_low: float
    ci_high: float
    p_value: float
    direction: str
    sequential_p_value: float
    sequential_ci_low: float
    sequential_ci_high: float
    def __init__(self, variant_a_mean: _Optional[float] = ..., variant_b_mean: _Optional[float] = ..., difference: _Optional[float] = ..., percent_change: _Optional[float] = ..., winner: _Optional[str] = ..., count_a: _Optional[int] = ..., count_b: _Optional[int] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., p_value: _Optional[float] = ..., direction: _Optional[str] = ..., sequential_p_value: _Optional[float] = ..., sequential_ci_low: _Optional[float] = ..., sequential_ci_high: _Optional[float] = ...) -> None: ...

class SampleRatio(_message.Message):
    __slots__ = ("count_a", "count_b", "expected_share_a", "p_value", "mismatch")
    COUNT_A_FIELD_NUMBER: _ClassVar[int]
    COUNT_B_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHARE_A_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    count_a: int
    count_b: int
    expected_share_a: float
    p_value: float
    mismatch: bool
    def __init__(self, count_a: _Optional[int] = ..., count_b: _Optional[int] = ..., expected_share_a: _Optional[float] = ..., p_value: _Optional[float] = ..., mismatch: _Optional[bool] = ...) -> None: ...

class AbAnalysis(_message.Message):
    __slots__ = ("test", "metrics", "sample_ratio", "method")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AbMetricAnalysis
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AbMetricAnalysis, _Mapping]] = ...) -> None: ...
    TEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    test: AbTestInfo
    metrics: _containers.MessageMap[str, AbMetricAnalysis]
    sample_ratio: SampleRatio
    method: str
    def __init__(self, test: _Optional[_Union[AbTestInfo, _Mapping]] = ..., metrics: _Optional[_Mapping[str, AbMetricAnalysis]] = ..., sample_ratio: _Optional[_Union[SampleRatio, _Mapping]] = ..., method: _Optional[str] = ...) -> None: ...

class EndAbTestRequest(_message.Message):
    __slots__ = ("test_name", "winner", "tag")
    TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    test_name: str
    winner: str
    tag: str
    def __init__(self, test_name: _Optional[str] = ..., winner: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class RevokeCertificateRequest(_message.Message):
    __slots__ = ("serial", "device_name", "admin_name", "reason")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    serial: str
    device_name: str
    admin_name: str
    reason: str
    def __init__(self, serial: _Optional[str] = ..., device_name: _Optional[str] = ..., admin_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokedCertificate(_message.Message):
    __slots__ = ("serial", "kind", "name", "reason", "revoked_at_ms")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    serial: str
    kind: str
    name: str
    reason: str
    revoked_at_ms: int
    def __init__(self, serial: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ..., revoked_at_ms: _Optional[int] = ...) -> None: ...

class ListRevokedCertificatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevokedCertificatesResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedCertificate]
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedCertificate, _Mapping]]] = ...) -> None: ...

class ListAuditLogRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("seq", "time_ms", "actor", "action", "target", "details_json", "prev_hash", "hash", "time_iso")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TIME_ISO_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_ms: int
    actor: str
    action: str
    target: str
    details_json: str
    prev_hash: str
    hash: str
    time_iso: str
    def __init__(self, seq: _Optional[int] = ..., time_ms: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., details_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., time_iso: _Optional[str] = ...) -> None: ...

class ListAuditLogResponse(_message.Message):
    __slots__ = ("entries", "head_seq", "head_hash")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    head_seq: int
    head_hash: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...

class VerifyAuditLogRequest(_message.Message):
    __slots__ = ("head",)
    HEAD_FIELD_NUMBER: _ClassVar[int]
    head: str
    def __init__(self, head: _Optional[str] = ...) -> None: ...

class AuditVerdict(_message.Message):
    __slots__ = ("ok", "rows", "head", "first_bad", "problem")
    OK_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    rows: int
    head: str
    first_bad: int
    problem: str
    def __init__(self, ok: _Optional[bool] = ..., rows: _Optional[int] = ..., head: _Optional[str] = ..., first_bad: _Optional[int] = ..., problem: _Optional[str] = ...) -> None: ...
