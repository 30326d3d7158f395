"""Response templates per intent, chosen by Thompson sampling over the user's ratings.

A response the user rated becomes a template of its intent. Each template
has a Beta(1 + successes, 1 + failures) posterior, where a rating r adds
s = (r - 1) / 4 to successes and 1 - s to failures. `suggest_response` asks
the intent classifier for the query's intent, prefers the templates whose
length matches the personalization engine's detail level (when any does),
draws once from each posterior and returns the template with the highest
draw; `rate_template` feeds the user's rating of what was shown back in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.assistant.intents import UNKNOWN
from client.assistant.personalization import Dimension, PersonalizationEngine, detail_of
from client.assistant.store import Connection, UserStore
from client.assistant.trainer import CustomModelTrainer

__all__ = ["ResponseTemplates", "Suggestion", "record_template"]


def _check_rating(rating: object) -> int:
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
    return rating


def record_template(db: Connection, intent: str, text: str, rating: int, ts: float) -> int:
    """Add (or update) the template text of intent with one rating; returns its id."""
    s = (_check_rating(rating) - 1) / 4.0
    db.execute(
        "INSERT INTO templates (intent, text, successes, failures, detail, ts) "
        "VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT (intent, text) DO NOTHING",
        (intent, text, detail_of(text), ts),
    )
    db.execute(
        "UPDATE templates SET successes = successes + ?, failures = failures + ?, ts = ? "
        "WHERE intent = ? AND text = ?",
        (s, 1.0 - s, ts, intent, text),
    )
    (row_id,) = db.execute(
        "SELECT id FROM templates WHERE intent = ? AND text = ?", (intent, text)
    ).fetchone()
    return int(row_id)


@dataclass(frozen=True)
class Suggestion:
    template_id: int
    intent: str
    text: str


class ResponseTemplates:
    def __init__(
        self,
        user_id: str,
        store: UserStore | None = None,
        trainer: CustomModelTrainer | None = None,
        engine: PersonalizationEngine | None = None,
        seed: int | None = None,
    ) -> None:
        self.store = store if store is not None else UserStore(user_id)
        self.trainer = trainer or CustomModelTrainer(user_id, store=self.store)
        self.engine = engine or PersonalizationEngine(user_id, store=self.store)
        self._rng = np.random.default_rng(seed)

    def add(self, intent: str, text: str, rating: int) -> int:
        from client.assistant.trainer import validate_intent

        validate_intent(intent)
        self.store.check_text("template text", text)
        with self.store.transaction() as db:
            return record_template(db, intent, text, rating, self.store.clock())

    def rate_template(self, template_id: int, rating: int) -> None:
        s = (_check_rating(rating) - 1) / 4.0
        with self.store.transaction() as db:
            if not db.execute(
                "UPDATE templates SET successes = successes + ?, failures = failures + ? "
                "WHERE id = ?",
                (s, 1.0 - s, template_id),
            ).rowcount:
                raise ValueError(f"no template {template_id!r}")

    def templates(self, intent: str) -> list[tuple[int, str, float, float, str]]:
        return [
            (int(i), str(t), float(a), float(b), str(d))
            for i, t, a, b, d in self.store.query(
                "SELECT id, text, successes, failures, detail FROM templates WHERE intent = ? "
                "ORDER BY id",
                (intent,),
            )
        ]

    def suggest_for_intent(self, intent: str) -> Suggestion | None:
        rows = self.templates(intent)
        if not rows:
            return None
        detail = self.engine.get_preference(Dimension.DETAIL).value
        matching = [r for r in rows if r[4] == detail]
        pool = matching or rows
        draws = [self._rng.beta(1.0 + a, 1.0 + b) for _, _, a, b, _ in pool]
        best = pool[int(np.argmax(draws))]
        return Suggestion(best[0], intent, best[1])

    def suggest_response(self, query: str) -> Suggestion | None:
        """A template for the query's intent, or None (unknown intent or no template)."""
        intent = self.trainer.predict_intent(query)
        if intent == UNKNOWN:
            return None
        return self.suggest_for_intent(intent)
