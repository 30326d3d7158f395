"""Contextual memory: facts (semantic), episodes (episodic) and workflows (procedural).

Facts are (category, key) -> JSON value; every set and delete is appended to
`fact_history`, so an update never loses what was there. Episodes are
timestamped events, read newest first and filtered by type and time range.
Workflows are named ordered steps; storing different steps under a name
adds a version, older versions stay readable.

`search` ranks all three with SQLite FTS5's BM25 over an index kept inside
the encrypted database (so the index is encrypted too) and updated in the
same transaction as the row it indexes. User text is never passed to FTS5 as
query syntax: it is split into words, each quoted, and OR-ed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from client.assistant.store import Connection, StoreLimitError, UserStore

__all__ = ["ContextualMemory"]

MAX_NAME_CHARS = 128
FACT, EPISODE, WORKFLOW = "fact", "episode", "workflow"


def _name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_CHARS:
        raise StoreLimitError(f"{what} has {len(value)} characters; the limit is {MAX_NAME_CHARS}")
    return value


def _flatten(value: object) -> str:
    """The words of a JSON value, for the search index."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(f"{k} {_flatten(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(_flatten(v) for v in value)
    return "" if value is None else str(value)


def _fts_query(text: str) -> str:
    words = re.findall(r"\w+", text.lower())
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words))


class ContextualMemory:
    """One user's long-term memory, in their encrypted store."""

    def __init__(self, user_id: str, store: UserStore | None = None) -> None:
        self.store = store if store is not None else UserStore(user_id)
        self.user_id = self.store.user_id

    def close(self) -> None:
        self.store.close()

    @staticmethod
    def _index(db: Connection, kind: str, ref: str, text: str) -> None:
        db.execute("DELETE FROM memory_fts WHERE kind = ? AND ref = ?", (kind, ref))
        if text:
            db.execute(
                "INSERT INTO memory_fts (kind, ref, text) VALUES (?, ?, ?)", (kind, ref, text)
            )

    # ------------------------------------------------------------------ facts
    def store_fact(self, category: str, key: str, value: Any) -> None:
        """Set a fact; the previous value stays in its history."""
        category, key = _name("category", category), _name("key", key)
        encoded = self.store.to_json("fact value", value)
        t = self.store.clock()
        with self.store.transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM facts WHERE category = ? AND key = ?", (category, key)
            ).fetchone()
            if not exists:
                self.store.check_count(db, "facts", self.store.limits.max_facts, "facts")
            db.execute(
                "INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?)", (category, key, encoded, t)
            )
            db.execute(
                "INSERT INTO fact_history (category, key, value, op, ts) "
                "VALUES (?, ?, ?, 'set', ?)",
                (category, key, encoded, t),
            )
            self._index(
                db, FACT, json.dumps([category, key]), f"{category} {key} {_flatten(value)}"
            )

    def retrieve_fact(self, category: str, key: str, default: Any = None) -> Any:
        rows = self.store.query(
            "SELECT value FROM facts WHERE category = ? AND key = ?", (category, key)
        )
        return json.loads(rows[0][0]) if rows else default

    def delete_fact(self, category: str, key: str) -> bool:
        """Remove a fact (its history keeps the deletion); False if there was none."""
        t = self.store.clock()
        with self.store.transaction() as db:
            gone = db.execute(
                "DELETE FROM facts WHERE category = ? AND key = ?", (category, key)
            ).rowcount
            if gone:
                db.execute(
                    "INSERT INTO fact_history (category, key, value, op, ts) "
                    "VALUES (?, ?, NULL, 'delete', ?)",
                    (category, key, t),
                )
                self._index(db, FACT, json.dumps([category, key]), "")
        return bool(gone)

    def fact_history(self, category: str, key: str) -> list[dict[str, Any]]:
        """Every change of a fact, oldest first: {"op", "value", "timestamp"}."""
        rows = self.store.query(
            "SELECT op, value, ts FROM fact_history WHERE category = ? AND key = ? ORDER BY id",
            (category, key),
        )
        return [
            {"op": op, "value": None if v is None else json.loads(v), "timestamp": ts}
            for op, v, ts in rows
        ]

    def facts(self, category: str | None = None) -> dict[str, dict[str, Any]]:
        sql, params = "SELECT category, key, value FROM facts", ()
        if category is not None:
            sql, params = sql + " WHERE category = ?", (category,)  # type: ignore[assignment]
        out: dict[str, dict[str, Any]] = {}
        for cat, key, value in self.store.query(sql + " ORDER BY category, key", params):
            out.setdefault(cat, {})[key] = json.loads(value)
        return out

    # ------------------------------------------------------------------ episodes
    def store_episode(
        self,
        event_type: str,
        description: str,
        context: dict[str, Any] | None = None,
        timestamp: float | None = None,
    ) -> int:
        """Record an event; returns its id."""
        event_type = _name("event_type", event_type)
        self.store.check_text("description", description)
        ctx = {} if context is None else context
        if not isinstance(ctx, dict):
            raise ValueError(f"context must be a dict, got {type(ctx).__name__}")
        encoded = self.store.to_json("context", ctx)
        t = self.store.clock() if timestamp is None else float(timestamp)
        with self.store.transaction() as db:
            self.store.check_count(db, "episodes", self.store.limits.max_episodes, "episodes")
            cur = db.execute(
                "INSERT INTO episodes (event_type, description, context, ts) VALUES (?, ?, ?, ?)",
                (event_type, description, encoded, t),
            )
            row_id = int(cur.lastrowid)
            self._index(db, EPISODE, str(row_id), f"{event_type} {description} {_flatten(ctx)}")
        self.store.maybe_purge()
        return row_id

    def retrieve_episodes(
        self,
        event_type: str | None = None,
        limit: int = 10,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Episodes newest first, optionally of one type and within [since, until]."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be an integer from 1 to 10000, got {limit!r}")
        where: list[str] = []
        params: list[object] = []
        if event_type is not None:
            where.append("event_type = ?")
            params.append(event_type)
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        if until is not None:
            where.append("ts <= ?")
            params.append(float(until))
        sql = "SELECT id, event_type, description, context, ts FROM episodes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.store.query(sql + " ORDER BY ts DESC, id DESC LIMIT ?", [*params, limit])
        return [
            {
                "id": i,
                "event_type": et,
                "description": d,
                "context": json.loads(c),
                "timestamp": ts,
            }
            for i, et, d, c, ts in rows
        ]

    # ------------------------------------------------------------------ workflows
    def store_workflow(self, name: str, steps: list[str]) -> int:
        """Store a workflow's steps; different steps add a version. Returns the version."""
        name = _name("workflow name", name)
        if not isinstance(steps, list | tuple) or not steps:
            raise ValueError("steps must be a non-empty list of strings")
        most = self.store.limits.max_workflow_steps
        if len(steps) > most:
            raise StoreLimitError(f"workflow has {len(steps)} steps; the limit is {most}")
        for i, step in enumerate(steps):
            self.store.check_text(f"step {i + 1}", step)
        encoded = json.dumps(list(steps), ensure_ascii=False)
        with self.store.transaction() as db:
            latest = db.execute(
                "SELECT version, steps FROM workflows WHERE name = ? ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchone()
            if latest is not None and latest[1] == encoded:
                return int(latest[0])
            if latest is None:
                (count,) = db.execute("SELECT count(DISTINCT name) FROM workflows").fetchone()
                if count >= self.store.limits.max_workflows:
                    raise StoreLimitError(
                        f"workflows: the store holds {count}, the limit; delete some first"
                    )
            version = 1 if latest is None else int(latest[0]) + 1
            db.execute(
                "INSERT INTO workflows VALUES (?, ?, ?, ?)",
                (name, version, encoded, self.store.clock()),
            )
            self._index(db, WORKFLOW, name, f"{name} {' '.join(steps)}")
        return version

    def retrieve_workflow(self, name: str, version: int | None = None) -> list[str] | None:
        """The steps of a workflow (latest version unless one is given), or None."""
        if version is None:
            rows = self.store.query(
                "SELECT steps FROM workflows WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
        else:
            rows = self.store.query(
                "SELECT steps FROM workflows WHERE name = ? AND version = ?", (name, version)
            )
        return list(json.loads(rows[0][0])) if rows else None

    def workflow_versions(self, name: str) -> list[int]:
        return [
            int(r[0])
            for r in self.store.query(
                "SELECT version FROM workflows WHERE name = ? ORDER BY version", (name,)
            )
        ]

    def delete_workflow(self, name: str) -> bool:
        with self.store.transaction() as db:
            gone = db.execute("DELETE FROM workflows WHERE name = ?", (name,)).rowcount
            self._index(db, WORKFLOW, name, "")
        return bool(gone)

    # ------------------------------------------------------------------ search
    def search(self, query: str, limit: int = 10) -> list[dict[str, Any]]:
        """Facts, episodes and workflows matching query's words, best (BM25) first."""
        self.store.check_text("query", query)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an integer from 1 to 1000, got {limit!r}")
        match = _fts_query(query)
        if not match:
            return []
        rows = self.store.query(
            "SELECT kind, ref, bm25(memory_fts) AS rank FROM memory_fts "
            "WHERE memory_fts MATCH ? ORDER BY rank LIMIT ?",
            (match, limit),
        )
        out: list[dict[str, Any]] = []
        for kind, ref, rank in rows:
            item: dict[str, Any] = {"kind": kind, "score": -float(rank)}
            if kind == FACT:
                category, key = json.loads(ref)
                item.update(category=category, key=key, value=self.retrieve_fact(category, key))
            elif kind == EPISODE:
                got = self.store.query(
                    "SELECT event_type, description, context, ts FROM episodes WHERE id = ?",
                    (int(ref),),
                )
                if not got:
                    continue
                et, d, c, ts = got[0]
                item.update(
                    id=int(ref),
                    event_type=et,
                    description=d,
                    context=json.loads(c),
                    timestamp=ts,
                )
            else:
                item.update(name=ref, steps=self.retrieve_workflow(ref))
            out.append(item)
        return out
