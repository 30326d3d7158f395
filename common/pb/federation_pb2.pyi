from common.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserDpMechanism(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USER_DP_NONE: _ClassVar[UserDpMechanism]
    USER_DP_SKELLAM: _ClassVar[UserDpMechanism]
    USER_DP_CENTRAL_GAUSSIAN: _ClassVar[UserDpMechanism]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK_SEED: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
USER_DP_NONE: UserDpMechanism
USER_DP_SKELLAM: UserDpMechanism
USER_DP_CENTRAL_GAUSSIAN: UserDpMechanism
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK_SEED: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class RegisterRequest(_message.Message):
    __slots__ = ("enrollment_key", "labels", "identity_public_key")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENROLLMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    enrollment_key: str
    labels: _containers.ScalarMap[str, str]
    identity_public_key: bytes
    def __init__(self, enrollment_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "token", "enrollment_index")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    token: str
    enrollment_index: int
    def __init__(self, device_id: _Optional[str] = ..., token: _Optional[str] = ..., enrollment_index: _Optional[int] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("max_wait_ms", "tasks", "models")
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    max_wait_ms: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_wait_ms: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("task", "wait", "finished", "ab_tests")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    AB_TESTS_FIELD_NUMBER: _ClassVar[int]
    task: Task
    wait: Wait
    finished: Finished
    ab_tests: _containers.RepeatedCompositeFieldContainer[AbAssignment]
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., ab_tests: _Optional[_Iterable[_Union[AbAssignment, _Mapping]]] = ...) -> None: ...

class AbAssignment(_message.Message):
    __slots__ = ("test_name", "variant", "model_name", "model_version", "metrics")
    TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    test_name: str
    variant: str
    model_name: str
    model_version: int
    metrics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, test_name: _Optional[str] = ..., variant: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., metrics: _Optional[_Iterable[str]] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class FitConfig(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "proximal_mu", "momentum", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float
    momentum: float
    extra: _containers.ScalarMap[str, str]
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., momentum: _Optional[float] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("round_id", "round_number", "model_name", "model_version", "model_spec", "config", "deadline_unix_ms", "model_bytes", "secagg", "privacy", "evaluation")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    round_number: int
    model_name: str
    model_version: int
    model_spec: _tensor_pb2.ModelSpec
    config: FitConfig
    deadline_unix_ms: int
    model_bytes: int
    secagg: SecAggConfig
    privacy: PrivacyConfig
    evaluation: EvaluationTask
    def __init__(self, round_id: _Optional[str] = ..., round_number: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., model_spec: _Optional[_Union[_tensor_pb2.ModelSpec, _Mapping]] = ..., config: _Optional[_Union[FitConfig, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., model_bytes: _Optional[int] = ..., secagg: _Optional[_Union[SecAggConfig, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyConfig, _Mapping]] = ..., evaluation: _Optional[_Union[EvaluationTask, _Mapping]] = ...) -> None: ...

class EvaluationTask(_message.Message):
    __slots__ = ("counts", "max_examples")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[str]
    max_examples: int
    def __init__(self, counts: _Optional[_Iterable[str]] = ..., max_examples: _Optional[int] = ...) -> None: ...

class PrivacyConfig(_message.Message):
    __slots__ = ("dp_sgd", "user_dp")
    DP_SGD_FIELD_NUMBER: _ClassVar[int]
    USER_DP_FIELD_NUMBER: _ClassVar[int]
    dp_sgd: DpSgdConfig
    user_dp: UserDpConfig
    def __init__(self, dp_sgd: _Optional[_Union[DpSgdConfig, _Mapping]] = ..., user_dp: _Optional[_Union[UserDpConfig, _Mapping]] = ...) -> None: ...

class DpSgdConfig(_message.Message):
    __slots__ = ("enabled", "noise_multiplier", "max_grad_norm", "target_epsilon", "delta", "planned_rounds")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    PLANNED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    planned_rounds: int
    def __init__(self, enabled: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., planned_rounds: _Optional[int] = ...) -> None: ...

class UserDpConfig(_message.Message):
    __slots__ = ("mechanism", "noise_multiplier", "clip_norm", "min_contributors", "delta", "target_quantile", "clip_count_noise")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TARGET_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    CLIP_COUNT_NOISE_FIELD_NUMBER: _ClassVar[int]
    mechanism: UserDpMechanism
    noise_multiplier: float
    clip_norm: float
    min_contributors: int
    delta: float
    target_quantile: float
    clip_count_noise: float
    def __init__(self, mechanism: _Optional[_Union[UserDpMechanism, str]] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., min_contributors: _Optional[int] = ..., delta: _Optional[float] = ..., target_quantile: _Optional[float] = ..., clip_count_noise: _Optional[float] = ...) -> None: ...

class SecAggConfig(_message.Message):
    __slots__ = ("enabled", "threshold", "degree", "clip_norm", "scale", "max_weight", "num_selected", "noise_variance", "min_contributors", "dimension", "indicator_scale")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_SELECTED_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDICATOR_SCALE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold: int
    degree: int
    clip_norm: float
    scale: float
    max_weight: int
    num_selected: int
    noise_variance: float
    min_contributors: int
    dimension: int
    indicator_scale: float
    def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[int] = ..., degree: _Optional[int] = ..., clip_norm: _Optional[float] = ..., scale: _Optional[float] = ..., max_weight: _Optional[int] = ..., num_selected: _Optional[int] = ..., noise_variance: _Optional[float] = ..., min_contributors: _Optional[int] = ..., dimension: _Optional[int] = ..., indicator_scale: _Optional[float] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("round_id", "ab_test")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    AB_TEST_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    ab_test: str
    def __init__(self, round_id: _Optional[str] = ..., ab_test: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("model_name", "version", "manifest", "total_bytes", "sha256", "model_spec")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    manifest: _tensor_pb2.Manifest
    total_bytes: int
    sha256: bytes
    model_spec: _tensor_pb2.ModelSpec
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., manifest: _Optional[_Union[_tensor_pb2.Manifest, _Mapping]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., model_spec: _Optional[_Union[_tensor_pb2.ModelSpec, _Mapping]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round_id", "base_version", "manifest", "total_bytes", "num_examples")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    base_version: int
    manifest: _tensor_pb2.Manifest
    total_bytes: int
    num_examples: int
    def __init__(self, round_id: _Optional[str] = ..., base_version: _Optional[int] = ..., manifest: _Optional[_Union[_tensor_pb2.Manifest, _Mapping]] = ..., total_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("round_id", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("round_id", "counts")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round_id: _Optional[str] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportPerformanceRequest(_message.Message):
    __slots__ = ("metrics", "ab_test", "model_name")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    AB_TEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    ab_test: str
    model_name: str
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ..., ab_test: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class ReportPerformanceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeclineTaskRequest(_message.Message):
    __slots__ = ("round_id", "reason")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    reason: str
    def __init__(self, round_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("participations_deleted", "ab_results_deleted")
    PARTICIPATIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    AB_RESULTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    participations_deleted: int
    ab_results_deleted: int
    def __init__(self, participations_deleted: _Optional[int] = ..., ab_results_deleted: _Optional[int] = ...) -> None: ...

class RoundKeys(_message.Message):
    __slots__ = ("device_id", "encryption_public_key", "mask_public_key", "signature", "identity_public_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    identity_public_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("round_id", "keys")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    keys: RoundKeys
    def __init__(self, round_id: _Optional[str] = ..., keys: _Optional[_Union[RoundKeys, _Mapping]] = ...) -> None: ...

class AdvertiseKeysResponse(_message.Message):
    __slots__ = ("participants", "neighbours", "degree", "threshold")
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedScalarFieldContainer[str]
    neighbours: _containers.RepeatedCompositeFieldContainer[RoundKeys]
    degree: int
    threshold: int
    def __init__(self, participants: _Optional[_Iterable[str]] = ..., neighbours: _Optional[_Iterable[_Union[RoundKeys, _Mapping]]] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("sender", "receiver", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    receiver: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., receiver: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round_id", "shares", "commitments")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    commitments: _containers.RepeatedCompositeFieldContainer[ShareCommitment]
    def __init__(self, round_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., commitments: _Optional[_Iterable[_Union[ShareCommitment, _Mapping]]] = ...) -> None: ...

class ShareCommitment(_message.Message):
    __slots__ = ("holder", "mask_key", "self_mask_seed")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SEED_FIELD_NUMBER: _ClassVar[int]
    holder: str
    mask_key: bytes
    self_mask_seed: bytes
    def __init__(self, holder: _Optional[str] = ..., mask_key: _Optional[bytes] = ..., self_mask_seed: _Optional[bytes] = ...) -> None: ...

class ShareKeysResponse(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class MaskedHeader(_message.Message):
    __slots__ = ("round_id", "total_elements", "total_bytes")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    total_elements: int
    total_bytes: int
    def __init__(self, round_id: _Optional[str] = ..., total_elements: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class MaskedChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: MaskedHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[MaskedHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadMaskedResponse(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class GetUnmaskRequestRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped", "total_survivors", "round_survivors", "round_completed", "completed_version")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    ROUND_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    total_survivors: int
    round_survivors: _containers.RepeatedScalarFieldContainer[str]
    round_completed: bool
    completed_version: int
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., total_survivors: _Optional[int] = ..., round_survivors: _Optional[_Iterable[str]] = ..., round_completed: _Optional[bool] = ..., completed_version: _Optional[int] = ...) -> None: ...

class ConfirmSurvivorsRequest(_message.Message):
    __slots__ = ("round_id", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    signature: bytes
    def __init__(self, round_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SurvivorSignature(_message.Message):
    __slots__ = ("device_id", "signature", "identity_public_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    signature: bytes
    identity_public_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class ConfirmSurvivorsResponse(_message.Message):
    __slots__ = ("signatures", "round_completed", "completed_version")
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    ROUND_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    signatures: _containers.RepeatedCompositeFieldContainer[SurvivorSignature]
    round_completed: bool
    completed_version: int
    def __init__(self, signatures: _Optional[_Iterable[_Union[SurvivorSignature, _Mapping]]] = ..., round_completed: _Optional[bool] = ..., completed_version: _Optional[int] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: ShareKind
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskSharesRequest(_message.Message):
    __slots__ = ("round_id", "shares", "unverifiable")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIABLE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    unverifiable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., unverifiable: _Optional[_Iterable[str]] = ...) -> None: ...

class UnmaskSharesResponse(_message.Message):
    __slots__ = ("round_completed", "completed_version")
    ROUND_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    round_completed: bool
    completed_version: int
    def __init__(self, round_completed: _Optional[bool] = ..., completed_version: _Optional[int] = ...) -> None: ...
