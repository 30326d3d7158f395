"""CustomModelTrainer: the user's training examples, personal intent models and their versions.

Examples live in the user's encrypted store. `train_intent_classifier`
refuses fewer than 50 labelled examples (the seed's message), holds out 20%
per intent for validation, fits a calibrated head (`intents`) over the body
(n-grams beside the federated intent model's body when the device has one,
else the shipped one), reports validation accuracy, then refits on every example
(warm-started) and stores the result as a new personal version, which
becomes active; any earlier version can be made active again (`rollback`).
The default body (`bodies.default_body`) is hashed n-grams beside the federated
or shipped fastText body; the fastText body joins the head as a
nearest-centroid expert over the user's intents (`intents.fit_with_prototypes`,
README "Figures"); any `TextBody` can be passed in.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.assistant.intents import (
    LEGACY_NGRAM_BODIES,
    UNKNOWN,
    IntentHead,
    MiniBatch,
    TextBody,
    train_head,
)
from client.assistant.store import UserStore

__all__ = ["MIN_EXAMPLES", "CustomModelTrainer", "IntentPrediction"]

MIN_EXAMPLES = 50
_INTENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass(frozen=True)
class IntentPrediction:
    intent: str  # UNKNOWN when below the threshold or when no model is trained
    confidence: float  # calibrated probability of the top intent
    ranked: list[tuple[str, float]]


def validate_intent(intent: object) -> str:
    if not isinstance(intent, str) or not _INTENT.fullmatch(intent):
        raise ValueError(
            f"intent {intent!r} must be 1-128 letters, digits and _ . : - starting with a "
            "letter or digit"
        )
    if intent == UNKNOWN:
        raise ValueError(f"{UNKNOWN!r} is reserved for text that matches no intent")
    return intent


class CustomModelTrainer:
    """One user's intent classifier, trained on their own examples, on their device."""

    def __init__(
        self, user_id: str, store: UserStore | None = None, body: TextBody | None = None
    ) -> None:
        self.store = store if store is not None else UserStore(user_id)
        self.user_id = self.store.user_id
        # A default body changes under the head (a new federated body, a new version):
        # then the head is retrained from the stored examples. A body given by the caller
        # is what the caller wants: a head of another body is refused instead.
        self._default_body = body is None
        if body is None:
            from client.assistant.bodies import default_body

            body = default_body(self.store.paths.home)
        self.body: TextBody = body
        self._head: IntentHead | None = None
        self._head_version: int | None = None

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ examples
    def add_training_example(
        self,
        input_text: str,
        output_text: str,
        context: Mapping[str, Any] | None = None,
        rating: int | None = None,
    ) -> int:
        """Store one example (intent from context["intent"]); returns its id."""
        store = self.store
        store.check_text("input_text", input_text)
        store.check_text("output_text", output_text, allow_empty=True)
        context = {} if context is None else context
        if not isinstance(context, Mapping):
            raise ValueError(f"context must be a mapping, got {type(context).__name__}")
        intent = context.get("intent")
        if intent is not None:
            intent = validate_intent(intent)
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5
        ):
            raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
        ctx = store.to_json("context", dict(context))
        with store.transaction() as db:
            store.check_count(
                db, "training_examples", store.limits.max_training_examples, "training examples"
            )
            cur = db.execute(
                "INSERT INTO training_examples (input_text, output_text, intent, context, rating, "
                "ts) VALUES (?, ?, ?, ?, ?, ?)",
                (input_text, output_text, intent, ctx, rating, store.clock()),
            )
            row_id = int(cur.lastrowid)
            if intent is not None and rating is not None and output_text.strip():
                from client.assistant.templates import record_template

                record_template(db, intent, output_text, rating, store.clock())
        return row_id

    def labelled_examples(self) -> list[tuple[str, str]]:
        rows = self.store.query(
            "SELECT input_text, intent FROM training_examples WHERE intent IS NOT NULL ORDER BY id"
        )
        return [(str(t), str(i)) for t, i in rows]

    # ------------------------------------------------------------------ training
    def train_intent_classifier(
        self, seed: int = 0, optimization: MiniBatch | None = None
    ) -> dict[str, Any]:
        """Train a new personal version; {"success": False, "error": ...} when it cannot.

        The head is fitted by L-BFGS to convergence unless `optimization`
        names an explicit mini-batch setting (learning rate, epochs, batch
        size); a setting that is not a `MiniBatch` is refused with ValueError.
        """
        if optimization is not None and not isinstance(optimization, MiniBatch):
            raise ValueError(
                f"optimization must be a MiniBatch or None, got {type(optimization).__name__}"
            )
        started = time.perf_counter()
        examples = self.labelled_examples()
        n = len(examples)
        if n < MIN_EXAMPLES:
            return {
                "success": False,
                "error": "Need at least 50 training examples",
                "examples_used": n,
            }
        texts = [t for t, _ in examples]
        labels = [i for _, i in examples]
        classes = sorted(set(labels))
        if len(classes) < 2:
            return {
                "success": False,
                "error": "Need examples of at least 2 intents",
                "examples_used": n,
            }
        previous = self.active_head()
        warm = previous if previous is not None and previous.body == self.body.name else None
        final, metrics = train_head(
            self.body, texts, labels, warm=warm, seed=seed, optimization=optimization
        )
        accuracy = float(metrics["accuracy"])
        threshold = float(metrics["unknown_threshold"])
        version = self._save_version(final, metrics)
        return {
            "success": True,
            "accuracy": accuracy,
            "examples_used": n,
            "version": version,
            "intents": len(classes),
            "validation_examples": metrics["validation_examples"],
            "unknown_threshold": threshold,
            "warm_start": warm is not None,
            "body": self.body.name,
            "prior_scale": metrics["prior_scale"],
            "optimization": "lbfgs" if optimization is None else optimization.describe(),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _save_version(self, head: IntentHead, metrics: dict[str, Any]) -> int:
        store = self.store
        with store.transaction() as db:
            (latest,) = db.execute(
                "SELECT coalesce(max(version), 0) FROM model_versions"
            ).fetchone()
            version = int(latest) + 1
            db.execute("UPDATE model_versions SET active = 0")
            db.execute(
                "INSERT INTO model_versions (version, created_at, body, metrics, weights, active) "
                "VALUES (?, ?, ?, ?, ?, 1)",
                (version, store.clock(), head.body, json.dumps(metrics), head.to_bytes()),
            )
            # Keep the newest versions (and always the active one).
            db.execute(
                "DELETE FROM model_versions WHERE active = 0 AND version <= ?",
                (version - store.limits.max_model_versions,),
            )
        self._head, self._head_version = head, version
        return version

    # ------------------------------------------------------------------ versions
    def versions(self) -> list[dict[str, Any]]:
        rows = self.store.query(
            "SELECT version, created_at, body, metrics, active FROM model_versions ORDER BY version"
        )
        return [
            {
                "version": v,
                "created_at": c,
                "body": b,
                "metrics": json.loads(m),
                "active": bool(a),
            }
            for v, c, b, m, a in rows
        ]

    def rollback(self, version: int) -> None:
        """Make an earlier (or later) personal version the active one."""
        with self.store.transaction() as db:
            if not db.execute(
                "SELECT 1 FROM model_versions WHERE version = ?", (version,)
            ).fetchone():
                known = [r[0] for r in db.execute("SELECT version FROM model_versions")]
                raise ValueError(f"no personal model version {version!r}; versions: {known}")
            db.execute("UPDATE model_versions SET active = (version = ?)", (version,))
        self._head, self._head_version = None, None

    def active_head(self) -> IntentHead | None:
        if self._head is None:
            rows = self.store.query(
                "SELECT version, weights FROM model_versions WHERE active = 1 LIMIT 1"
            )
            if rows:
                self._head_version = int(rows[0][0])
                self._head = IntentHead.from_bytes(rows[0][1])
        return self._head

    # ------------------------------------------------------------------ prediction
    def predict(self, text: str, top_k: int = 3) -> IntentPrediction:
        self.store.check_text("text", text)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        head = self.active_head()
        if head is None:
            return IntentPrediction(UNKNOWN, 0.0, [])
        if head.body != self.body.name and (self._default_body or head.body in LEGACY_NGRAM_BODIES):
            head = self._retrain_legacy(head.body)
        if head.body != self.body.name:
            raise RuntimeError(
                f"the active personal model was trained on body {head.body!r}, this trainer "
                f"uses {self.body.name!r}; retrain or roll back"
            )
        p = head.proba(self.body.embed([text]))[0]
        order = np.argsort(-p)[:top_k]
        ranked = [(head.classes[j], float(p[j])) for j in order]
        best, confidence = ranked[0]
        return IntentPrediction(
            best if confidence >= head.threshold else UNKNOWN, confidence, ranked
        )

    def _retrain_legacy(self, old_body: str) -> IntentHead:
        """A head of a body this trainer no longer has: retrain from the stored examples."""
        result = self.train_intent_classifier()
        head = self.active_head()
        if not result.get("success") or head is None:
            raise RuntimeError(
                f"the active personal model was trained on body {old_body!r}, which was "
                f"replaced, and retraining failed: {result.get('error')}"
            )
        return head

    def predict_intent(self, text: str) -> str:
        """The user's intent for text, or "unknown" when the model is not sure enough."""
        return self.predict(text).intent

    def rank_intents(self, text: str, top_k: int = 3) -> list[tuple[str, float]]:
        """The top_k intents with calibrated confidences."""
        return self.predict(text, top_k).ranked
