"""ContextualMemory: facts with history, episodes, versioned workflows, BM25 search, retention."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.assistant.memory import ContextualMemory
from client.assistant.store import Limits, StoreLimitError, UserStore

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
def memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> Iterator[ContextualMemory]:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    mem = ContextualMemory("mo", store=UserStore("mo", home=tmp_path, clock=clock))
    yield mem
    mem.close()


def test_facts_update_and_delete_keep_history(memory: ContextualMemory, clock: Clock) -> None:
    memory.store_fact("work", "role", "Developer")
    clock.t += 10
    memory.store_fact("work", "role", "Senior Developer")
    assert memory.retrieve_fact("work", "role") == "Senior Developer"
    assert memory.delete_fact("work", "role")
    assert memory.retrieve_fact("work", "role") is None
    assert not memory.delete_fact("work", "role")
    history = memory.fact_history("work", "role")
    assert [(h["op"], h["value"]) for h in history] == [
        ("set", "Developer"),
        ("set", "Senior Developer"),
        ("delete", None),
    ]
    memory.store_fact("prefs", "langs", ["Python", "Rust"])
    assert memory.facts() == {"prefs": {"langs": ["Python", "Rust"]}}


def test_episodes_newest_first_by_type_time_range_and_limit(
    memory: ContextualMemory, clock: Clock
) -> None:
    for i in range(6):
        clock.t = 1.7e9 + i * 100
        memory.store_episode("meeting" if i % 2 == 0 else "call", f"event {i}", {"i": i})
    assert [e["description"] for e in memory.retrieve_episodes(limit=3)] == [
        "event 5",
        "event 4",
        "event 3",
    ]
    meetings = memory.retrieve_episodes(event_type="meeting", limit=5)
    assert [e["context"]["i"] for e in meetings] == [4, 2, 0]
    window = memory.retrieve_episodes(since=1.7e9 + 100, until=1.7e9 + 300)
    assert [e["description"] for e in window] == ["event 3", "event 2", "event 1"]
    with pytest.raises(ValueError, match="limit must be"):
        memory.retrieve_episodes(limit=0)


def test_workflows_are_versioned(memory: ContextualMemory) -> None:
    assert memory.store_workflow("morning", ["a", "b"]) == 1
    assert memory.store_workflow("morning", ["a", "b"]) == 1  # unchanged: no new version
    assert memory.store_workflow("morning", ["a", "b", "c"]) == 2
    assert memory.retrieve_workflow("morning") == ["a", "b", "c"]
    assert memory.retrieve_workflow("morning", version=1) == ["a", "b"]
    assert memory.workflow_versions("morning") == [1, 2]
    assert memory.retrieve_workflow("evening") is None
    with pytest.raises(ValueError, match="non-empty list"):
        memory.store_workflow("x", [])


def test_bad_input_is_refused_and_nothing_changes(memory: ContextualMemory) -> None:
    memory.store_fact("a", "b", 1)
    with pytest.raises(ValueError, match="category must be a non-empty string"):
        memory.store_fact("", "b", 2)
    with pytest.raises(StoreLimitError, match="key has 200 characters"):
        memory.store_fact("a", "k" * 200, 2)
    with pytest.raises(ValueError, match="JSON-serializable"):
        memory.store_fact("a", "b", {1, 2})
    with pytest.raises(ValueError, match="description is empty"):
        memory.store_episode("note", "")
    with pytest.raises(ValueError, match="query is empty"):
        memory.search("")
    assert memory.retrieve_fact("a", "b") == 1
    assert memory.retrieve_episodes() == []


def test_count_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    limits = Limits(max_facts=2, max_workflow_steps=3)
    mem = ContextualMemory("lim", store=UserStore("lim", home=tmp_path, limits=limits))
    mem.store_fact("c", "1", 1)
    mem.store_fact("c", "2", 2)
    mem.store_fact("c", "2", 3)  # an update is not a new entry
    with pytest.raises(StoreLimitError, match="facts: the store holds 2, the limit"):
        mem.store_fact("c", "3", 3)
    with pytest.raises(StoreLimitError, match="4 steps; the limit is 3"):
        mem.store_workflow("w", ["a", "b", "c", "d"])
    mem.close()


def _bm25(docs: list[str], query: str) -> list[float]:
    """Plain BM25 (k1 = 1.2, b = 0.75, FTS5's idf) as the independent reference."""
    toks = [re.findall(r"\w+", d.lower()) for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    q = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
    n_docs = len(docs)
    scores = []
    for t in toks:
        tf = Counter(t)
        s = 0.0
        for w in q:
            n = sum(1 for d in toks if w in d)
            idf = max(math.log((n_docs - n + 0.5) / (n + 0.5)), 1e-6)
            f = tf[w]
            s += idf * f * 2.2 / (f + 1.2 * (1 - 0.75 + 0.75 * len(t) / avg))
        scores.append(s)
    return scores


def test_search_ranks_like_bm25(memory: ContextualMemory) -> None:
    texts = [
        "database migration planning with the data team",
        "lunch with Alice",
        "postgres database index tuning database performance",
        "weekly standup",
        "quarterly review of team goals",
        "coffee with Bob about hiking",
    ]
    for t in texts:
        memory.store_episode("note", t)
    docs = [f"note {t} " for t in texts]
    expected = _bm25(docs, "database team")
    got = memory.search("database team", limit=10)
    assert [g["description"] for g in got] == [
        texts[i] for i in sorted(range(len(texts)), key=lambda i: -expected[i]) if expected[i] > 0
    ]
    for g in got:
        assert g["score"] == pytest.approx(expected[texts.index(g["description"])], rel=1e-6)


def test_search_covers_all_kinds_and_survives_query_syntax(memory: ContextualMemory) -> None:
    memory.store_fact("preferences", "favorite_language", "Python")
    memory.store_episode("meeting", "Weekly team standup", {"attendees": ["Alice", "Bob"]})
    memory.store_workflow("morning_routine", ["Check email", "Review calendar"])
    kinds = {r["kind"] for r in memory.search("python alice calendar")}
    assert kinds == {"fact", "episode", "workflow"}
    # FTS5 operators in user text are words, not syntax.
    assert memory.search('python" OR NEAR( * AND') != []
    memory.delete_fact("preferences", "favorite_language")
    assert [r["kind"] for r in memory.search("python")] == []
    assert len(memory.search("standup", limit=1)) == 1


def test_retention_purges_old_episodes_and_interactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    store = UserStore("ret", home=tmp_path, clock=clock)
    mem = ContextualMemory("ret", store=store)
    mem.store_episode("note", "ancient history")
    with store.transaction() as db:
        db.execute(
            "INSERT INTO interactions (ts, query, response, context, feedback) "
            "VALUES (?, 'q', 'r', '{}', 3)",
            (clock.t,),
        )
    store.set_retention_days(30)
    clock.t += 31 * DAY
    mem.store_episode("note", "fresh")  # a write past the purge interval runs the purge
    assert [e["description"] for e in mem.retrieve_episodes()] == ["fresh"]
    assert store.query("SELECT count(*) FROM interactions") == [(0,)]
    assert mem.search("ancient") == []
    with pytest.raises(ValueError, match="retention must be"):
        store.set_retention_days(0)
    mem.close()
    # And on open.
    clock.t += 31 * DAY
    store = UserStore("ret", home=tmp_path, clock=clock)
    assert store.query("SELECT count(*) FROM episodes") == [(0,)]
    store.close()
