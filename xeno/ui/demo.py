"""The demo the app opens with `--demo`: a user with history, and a short real federation.

`seed_user` gives the user rated interactions (so preferences are learned
with a confidence), an explicit choice, consent, CLINC150 training examples of
a few intents and two personal model versions. `seed_federation` runs real
rounds of the intent model with `PersonalizedModelManager` (secure
aggregation and user-level DP over loopback gRPC, three simulated users), so
the model has a version history, a privacy ledger and round metrics; then
it records an evaluation series (accuracy improving, latency drifting up,
which raises a degradation alert), and an A/B test of two versions with
results. Each part runs once per folder: a marker file records it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("xeno.ui.demo")

DEMO_MODEL = "intents-fasttext"
DEMO_INTENTS = ("timer", "weather", "play_music", "alarm")
_TOPIC_QUERIES = {
    "python": (
        "how do I profile the GIL contention in my asyncio service",
        "what is a list comprehension, I'm new to python",
        "explain the descriptor protocol and metaclass interaction",
        "optimize the memory layout of numpy arrays for cache misses",
    ),
    "cooking": (
        "what is the simplest way to boil an egg",
        "how do I start baking bread, I'm a beginner",
    ),
}


def _examples(per_intent: int, offset: int = 0) -> list[tuple[str, str]]:
    from common.data.clinc150 import load_clinc150

    data = load_clinc150()
    index = {name: i for i, name in enumerate(data.intents)}
    out: list[tuple[str, str]] = []
    for intent in DEMO_INTENTS:
        texts = [
            t
            for t, y in zip(data.train.texts, data.train.labels, strict=True)
            if y == index[intent]
        ]
        out += [(t, intent) for t in texts[offset : offset + per_intent]]
    return out


def seed_user(home: Path, user: str, per_intent: int = 20, versions: int = 2) -> None:
    """A user with rated interactions, an explicit choice, consent, examples and versions."""
    from client.assistant.consent import Scope, record
    from client.assistant.store import UserStore
    from xeno.model_finetuning import CustomModelTrainer, PersonalizationEngine

    with UserStore(user, home=home) as store:
        engine = PersonalizationEngine(user, store=store)
        engine.update_preference("detail_level", "detailed")
        labels = {"style": "technical", "tone": "neutral", "format": "bullet_points"}
        for i in range(14):
            good = i % 4 != 3
            context: dict[str, Any] = (
                dict(labels) if good else {"style": "casual", "tone": "humorous"}
            )
            topic = "python" if i % 3 else "cooking"
            queries = _TOPIC_QUERIES[topic]
            context["topic"] = topic
            engine.record_interaction(
                queries[i % len(queries)],
                "- step one\n- step two\n- use `timeit` to measure" if good else "haha sure, dunno",
                context,
                user_feedback=5 if good else 2,
            )
        record(store, Scope.FEDERATED_TRAINING, True)
        record(store, Scope.PERSONALIZATION, True)
        trainer = CustomModelTrainer(user, store=store)
        examples = _examples(per_intent)
        # Each version sees more of the examples, as a user adding them over time would.
        cuts = [52 + (len(examples) - 52) * v // max(1, versions - 1) for v in range(versions)]
        added = 0
        for v, cut in enumerate(cuts):
            for text, intent in examples[added:cut]:
                trainer.add_training_example(text, "", {"intent": intent})
            added = cut
            trainer.train_intent_classifier(seed=v)


def seed_federation(db: str, home: Path, rounds: int = 2, users: int = 3) -> None:
    """Real rounds of the intent model, then an evaluation series and an A/B test."""
    from xeno.federated_learning import FederationSettings, PersonalizedModelManager
    from xeno.model_versioning import ABTestingManager, ModelVersionControl, PerformanceTracker

    manager = PersonalizedModelManager(
        db,
        home=home,
        settings=FederationSettings(
            local_epochs=1, batch_size=16, learning_rate=5.0, min_secagg_cohort=users
        ),
    )
    try:
        manager.create_model(DEMO_MODEL, privacy_enabled=True)
        data = _examples(10, offset=40)
        for r in range(rounds):
            for u in range(users):
                mine = data[u::users]
                local = [{"input_text": t, "context": {"intent": i}} for t, i in mine]
                manager.train_local_model(f"demo-user-{u}", DEMO_MODEL, local)
            result = manager.update_global_model(DEMO_MODEL, min_updates=users)
            log.info("demo round %d: %s", r + 1, result)
    finally:
        manager.close()
    versions = ModelVersionControl(db)
    tracker = PerformanceTracker(db)
    ab = ABTestingManager(db)
    try:
        history = versions.list_versions(DEMO_MODEL)
        head = history[-1]["version"]
        # An evaluation series per version, as an evaluation job would record it.
        for i in range(12):
            tracker.record_metric(
                DEMO_MODEL, "accuracy", 0.62 + 0.02 * i + 0.01 * (i % 2), {"eval": "daily"}
            )
            tracker.record_metric(
                DEMO_MODEL, "latency_ms", 40.0 + 0.5 * i + (12.0 if i == 11 else 0.0)
            )
        first = history[0]["version"]
        versions.rollback(DEMO_MODEL, first, created_by="demo", reason="demo: compare the start")
        versions.rollback(DEMO_MODEL, head, created_by="demo", reason="demo: back to the newest")
        test = "demo-newest-vs-first"
        ab.create_test(test, f"{DEMO_MODEL}:{first}", f"{DEMO_MODEL}:{head}", 0.5, ["accuracy"])
        for i in range(20):
            ab.record_result(test, "variant_a", {"accuracy": 0.60 + 0.01 * (i % 5)})
            ab.record_result(test, "variant_b", {"accuracy": 0.70 + 0.01 * (i % 5)})
    finally:
        versions.close()
        tracker.close()
        ab.close()


def seed_demo(home: Path, db: str, user: str) -> None:
    """Seed home (the user) and db (the federation) unless done before; fast after the first."""
    home.mkdir(parents=True, exist_ok=True)
    # The demo's own device key: never the OS keyring or a key of the real assistant.
    os.environ.setdefault("XENO_DEVICE_KEY_FILE", str(home / "device.key"))
    marker = home / "demo.json"
    done: dict[str, Any] = json.loads(marker.read_text()) if marker.exists() else {}
    if user not in done.get("users", []):
        seed_user(home, user)
        done.setdefault("users", []).append(user)
        marker.write_text(json.dumps(done))
    if db not in done.get("databases", []):
        seed_federation(db, home)
        done.setdefault("databases", []).append(db)
        marker.write_text(json.dumps(done))
