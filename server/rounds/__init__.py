"""Round coordination: cohort selection, deadlines, streaming aggregation, new versions."""

from server.rounds.coordinator import (
    CheckInOutcome,
    RoundConfig,
    RoundCoordinator,
    RoundSummary,
    TaskInfo,
    UploadSession,
    check_strategy,
)

__all__ = [
    "CheckInOutcome",
    "RoundConfig",
    "RoundCoordinator",
    "RoundSummary",
    "TaskInfo",
    "UploadSession",
    "check_strategy",
]
