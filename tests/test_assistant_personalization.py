"""PersonalizationEngine: validated preferences, learning with posteriors, decay, switches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scipy import stats

from client.assistant.personalization import (
    ALLOWED,
    Dimension,
    PersonalizationEngine,
    detail_of,
    observe_response,
    vocabulary_level,
)
from client.assistant.store import StoreLimitError, UserStore

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.t = 1.7e9

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> Iterator[PersonalizationEngine]:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    store = UserStore("pat", home=tmp_path, clock=clock)
    eng = PersonalizationEngine("pat", store=store)
    yield eng
    eng.close()


def words(n: int) -> str:
    return " ".join(["word"] * n)


def test_unknown_keys_and_values_name_the_allowed_ones(engine: PersonalizationEngine) -> None:
    with pytest.raises(ValueError, match="allowed: communication_style, detail_level"):
        engine.update_preference("colour", "blue")
    with pytest.raises(ValueError, match="allowed: professional, casual, friendly, technical"):
        engine.update_preference("communication_style", "sarcastic")
    with pytest.raises(ValueError, match="allowed: beginner, intermediate, advanced, expert"):
        engine.update_preference("expertise_level.python", "guru")
    with pytest.raises(ValueError, match="topic"):
        engine.update_preference("expertise_level.", "expert")
    assert engine.explicit_preferences() == {}


def test_values_are_normalized(engine: PersonalizationEngine) -> None:
    engine.update_preference("response_format", "Bullet Points")
    assert engine.get_preference("response_format").value == "bullet_points"


@pytest.mark.parametrize("bad", [0, 6, 3.5, "5", True])
def test_feedback_outside_1_to_5_is_refused_and_nothing_stored(
    engine: PersonalizationEngine, bad: object
) -> None:
    with pytest.raises(ValueError, match="user_feedback must be an integer from 1 to 5"):
        engine.record_interaction("q", "r", {}, user_feedback=bad)  # type: ignore[arg-type]
    assert engine.store.query("SELECT count(*) FROM interactions") == [(0,)]


def test_empty_or_oversized_text_is_refused(engine: PersonalizationEngine) -> None:
    with pytest.raises(ValueError, match="query is empty"):
        engine.record_interaction("  ", "r", {}, 3)
    with pytest.raises(StoreLimitError, match="response has 10001 characters"):
        engine.record_interaction("q", "x" * 10_001, {}, 3)
    assert engine.store.query("SELECT count(*) FROM interactions") == [(0,)]


def test_detail_is_learned_from_which_lengths_are_rated_well(
    engine: PersonalizationEngine,
) -> None:
    for _ in range(6):
        engine.record_interaction("q", words(20), {}, 2)
        engine.record_interaction("q", words(300), {}, 5)
        engine.record_interaction("q", words(100), {}, 3)
    pref = engine.get_preference(Dimension.DETAIL)
    assert (pref.value, pref.source) == ("detailed", "learned")
    assert pref.confidence > 0.9
    # The posterior is the Beta an independent computation gives.
    a, b = engine.posterior(Dimension.DETAIL)["detailed"]
    assert (a, b) == pytest.approx((1 + 6 * 1.0, 1 + 6 * 0.0))
    a, b = engine.posterior(Dimension.DETAIL)["brief"]
    assert (a, b) == pytest.approx((1 + 6 * 0.25, 1 + 6 * 0.75))
    # The confidence matches P(detailed is best) computed by scipy integration.
    post = engine.posterior(Dimension.DETAIL)
    dists = {v: stats.beta(*ab) for v, ab in post.items()}
    grid = [i / 2000 for i in range(1, 2000)]
    p_best = sum(
        dists["detailed"].pdf(x) * dists["brief"].cdf(x) * dists["medium"].cdf(x) / 2000
        for x in grid
    )
    assert pref.confidence == pytest.approx(p_best, abs=0.02)


def test_explicit_wins_over_learned_and_clearing_restores_learned(
    engine: PersonalizationEngine,
) -> None:
    for _ in range(5):
        engine.record_interaction("q", words(20), {"style": "casual"}, 5)
    assert engine.get_preference(Dimension.STYLE).value == "casual"
    engine.update_preference("communication_style", "professional")
    assert engine.get_preference(Dimension.STYLE).source == "explicit"
    assert engine.get_preference(Dimension.STYLE).value == "professional"
    assert engine.plan_response()[Dimension.STYLE] == "professional"
    engine.clear_preference("communication_style")
    assert engine.get_preference(Dimension.STYLE).value == "casual"


def test_learning_switch_per_dimension(engine: PersonalizationEngine) -> None:
    for _ in range(5):
        engine.record_interaction("q", words(300), {"style": "technical"}, 5)
    engine.set_learning(Dimension.DETAIL, False)
    assert engine.get_preference(Dimension.DETAIL).source == "default"
    assert engine.get_preference(Dimension.STYLE).value == "technical"  # others still learn
    with pytest.raises(ValueError, match="unknown dimension"):
        engine.set_learning("mood", False)


def test_old_evidence_decays(engine: PersonalizationEngine, clock: Clock) -> None:
    for _ in range(10):
        engine.record_interaction("q", words(20), {}, 5)  # liked brief, long ago
    clock.t += 300 * DAY
    for _ in range(3):
        engine.record_interaction("q", words(300), {}, 5)  # likes detailed now
        engine.record_interaction("q", words(20), {}, 1)
    assert engine.get_preference(Dimension.DETAIL).value == "detailed"
    a, b = engine.posterior(Dimension.DETAIL)["brief"]
    w = 0.5 ** (300 / 90)
    assert (a, b) == pytest.approx((1 + 10 * w, 1 + 3))


def test_expertise_from_vocabulary_and_ratings(engine: PersonalizationEngine) -> None:
    assert engine.analyze_expertise_level("rust") == "intermediate"  # no evidence: default
    for _ in range(4):
        engine.record_interaction(
            "What is a variable? I'm new to this, explain simply",
            words(20),
            {"topic": "rust"},
            5,
        )
    assert engine.analyze_expertise_level("rust") == "beginner"
    for _ in range(4):
        engine.record_interaction(
            "How do I optimize query plan latency and index concurrency?",
            words(300),
            {"topic": "database"},
            5,
        )
    assert engine.analyze_expertise_level("database") in {"advanced", "expert"}
    engine.update_preference("expertise_level.database", "beginner")
    assert engine.analyze_expertise_level("database") == "beginner"
    assert vocabulary_level("what is python") < vocabulary_level("optimize GIL concurrency")


def test_prompt_prefix_composes_everything(engine: PersonalizationEngine) -> None:
    engine.update_preference("communication_style", "technical")
    engine.update_preference("tone", "formal")
    engine.update_preference("detail_level", "brief")
    engine.update_preference("response_format", "bullet_points")
    engine.update_preference("expertise_level.python", "expert")
    prefix = engine.get_personalized_prompt_prefix("python")
    assert prefix.splitlines() == [
        "Respond in a formal tone with a technical style.",
        "Keep answers brief: a few sentences, no digressions.",
        "Present the answer as bullet points.",
        "The user is expert in python: be precise and technical; no introductions.",
    ]


def test_observation_of_responses() -> None:
    assert detail_of(words(10)) == "brief"
    assert detail_of(words(100)) == "medium"
    assert detail_of(words(250)) == "detailed"
    seen = observe_response("- one\n- two\n- three", {"style": "casual"})
    assert seen["response_format"] == "bullet_points"
    assert seen["communication_style"] == "casual"
    assert observe_response("Hey, cool stuff, gonna work", {})["communication_style"] == "casual"
    assert set(ALLOWED) == {d.value for d in Dimension}


def test_preferences_persist_across_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    eng = PersonalizationEngine("quinn", store=UserStore("quinn", home=tmp_path))
    eng.update_preference("tone", "humorous")
    eng.close()
    eng = PersonalizationEngine("quinn", store=UserStore("quinn", home=tmp_path))
    assert eng.get_preference("tone").value == "humorous"
    eng.close()
