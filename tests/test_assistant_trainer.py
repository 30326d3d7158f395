"""CustomModelTrainer and response templates: training, calibration, unknown, versions, bandit."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from assistant_intents import RESPONSES, examples
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from client.assistant.bodies import FastTextBody
from client.assistant.intents import (
    UNKNOWN,
    HashedNgramBody,
    IntentHead,
    MiniBatch,
    StackedBody,
    calibrate,
    fit_head,
    stratified_split,
)
from client.assistant.store import StoreLimitError, UserStore
from client.assistant.templates import ResponseTemplates
from client.assistant.trainer import CustomModelTrainer
from common.text import TextFeatures, tokenize


@pytest.fixture
def trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CustomModelTrainer]:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    t = CustomModelTrainer("tia", store=UserStore("tia", home=tmp_path))
    yield t
    t.close()


def fill(trainer: CustomModelTrainer, count: int, seed: int = 0) -> None:
    for text, intent in examples(count, seed):
        trainer.add_training_example(text, RESPONSES[intent], {"intent": intent}, 5)


def test_refuses_fewer_than_50_with_the_seeds_message(trainer: CustomModelTrainer) -> None:
    fill(trainer, 49)
    result = trainer.train_intent_classifier()
    assert result == {
        "success": False,
        "error": "Need at least 50 training examples",
        "examples_used": 49,
    }
    assert trainer.versions() == []
    assert trainer.predict_intent("Set up a call with Sarah") == UNKNOWN


def test_trains_predicts_and_reports_validation_accuracy(trainer: CustomModelTrainer) -> None:
    fill(trainer, 150)
    result = trainer.train_intent_classifier()
    assert result["success"] is True
    assert result["examples_used"] == 150
    assert result["validation_examples"] == 30  # 20% of each of the 5 intents
    assert result["accuracy"] >= 0.9
    held_out = examples(100, seed=99)
    correct = sum(trainer.predict(t).ranked[0][0] == i for t, i in held_out)
    assert correct / len(held_out) >= 0.9
    assert trainer.predict_intent("Set up a call with Sarah") == "schedule_meeting"
    ranked = trainer.rank_intents("Will it rain tomorrow", top_k=3)
    assert next(r[0] for r in ranked) == "weather"
    assert len(ranked) == 3
    assert sum(c for _, c in ranked) <= 1.0 + 1e-9


def test_unrelated_text_is_unknown_more_often_than_in_scope(trainer: CustomModelTrainer) -> None:
    fill(trainer, 200)
    trainer.train_intent_classifier()
    out_of_scope = [
        "What is the capital of Mongolia",
        "How many calories are in an avocado",
        "Translate goodbye into Italian",
        "Who won the chess olympiad",
        "Explain quantum entanglement",
        "Recommend a good novel",
    ]
    in_scope = [t for t, _ in examples(60, seed=7)]
    unknown_oos = np.mean([trainer.predict_intent(t) == UNKNOWN for t in out_of_scope])
    unknown_in = np.mean([trainer.predict_intent(t) == UNKNOWN for t in in_scope])
    assert unknown_oos >= 0.5
    assert unknown_in <= 0.15


def test_versions_warm_start_and_rollback(trainer: CustomModelTrainer) -> None:
    fill(trainer, 60)
    first = trainer.train_intent_classifier()
    assert first["version"] == 1 and first["warm_start"] is False
    fill(trainer, 60, seed=1)
    second = trainer.train_intent_classifier()
    assert second["version"] == 2 and second["warm_start"] is True
    # The default body's fastText part joins as the centroid expert, recorded per version.
    assert second["prior_scale"] == 2.0 == trainer.versions()[1]["metrics"]["prior_scale"]
    assert [v["active"] for v in trainer.versions()] == [False, True]
    trainer.rollback(1)
    assert [v["active"] for v in trainer.versions()] == [True, False]
    with pytest.raises(ValueError, match="no personal model version 9"):
        trainer.rollback(9)
    assert [v["active"] for v in trainer.versions()] == [True, False]


def test_bad_examples_are_refused_and_nothing_stored(trainer: CustomModelTrainer) -> None:
    with pytest.raises(ValueError, match="input_text is empty"):
        trainer.add_training_example("", "x", {"intent": "a"}, 5)
    with pytest.raises(StoreLimitError, match="input_text has"):
        trainer.add_training_example("x" * 20_000, "x", {"intent": "a"}, 5)
    with pytest.raises(ValueError, match="rating must be an integer from 1 to 5"):
        trainer.add_training_example("hi", "x", {"intent": "a"}, 0)
    with pytest.raises(ValueError, match="intent"):
        trainer.add_training_example("hi", "x", {"intent": "bad intent!"}, 5)
    with pytest.raises(ValueError, match="reserved"):
        trainer.add_training_example("hi", "x", {"intent": "unknown"}, 5)
    with pytest.raises(ValueError, match="text is empty"):
        trainer.predict_intent(" ")
    assert trainer.labelled_examples() == []


def test_stratified_split_keeps_each_intents_share() -> None:
    labels = ["a"] * 50 + ["b"] * 20 + ["c"] * 5 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted([*train, *val]) == list(range(len(labels)))
    got = Counter(labels[i] for i in val)
    assert got == {"a": 10, "b": 4, "c": 1}


def test_head_fit_matches_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = [("a", "b", "c")[int(v)] for v in np.argmax(x[:, :3] + 0.3 * rng.normal(size=(120, 3)), 1)]
    l2 = 0.05
    head = fit_head(x, y, ["a", "b", "c"], l2=l2, max_iter=2000)
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=5000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(
        special.softmax(head.logits(x), axis=1), ref.predict_proba(x), atol=2e-3
    )


def test_one_full_batch_sgd_epoch_is_one_gradient_step_from_zero() -> None:
    # At W = 0 every class has probability 1/k: the gradient of the mean cross-entropy is
    # X^T (1/k - Y) / n for the weights and mean(1/k - Y) for the bias (l2 adds nothing).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 5))
    y = [("a", "b", "c")[i % 3] for i in range(30)]
    onehot = np.eye(3)[[i % 3 for i in range(30)]]
    lr = 0.3
    head = fit_head(x, y, ["a", "b", "c"], optimization=MiniBatch(lr, 1, 1000, "sgd"))
    np.testing.assert_allclose(head.weights, lr * x.T @ (onehot - 1 / 3) / 30, atol=1e-12)
    np.testing.assert_allclose(head.bias, lr * (onehot - 1 / 3).mean(axis=0), atol=1e-12)


def test_mini_batch_adam_reaches_the_logistic_regression_optimum() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = [("a", "b", "c")[int(v)] for v in np.argmax(x[:, :3] + 0.3 * rng.normal(size=(120, 3)), 1)]
    l2 = 0.05
    head = fit_head(x, y, ["a", "b", "c"], l2=l2, optimization=MiniBatch(0.02, 400, 120, "adam"))
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=5000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(
        special.softmax(head.logits(x), axis=1), ref.predict_proba(x), atol=1e-2
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0.0}, "learning rate must be in (0, 10], got 0.0"),
        ({"learning_rate": -1.0}, "learning rate must be in (0, 10], got -1.0"),
        ({"learning_rate": 11.0}, "learning rate must be in (0, 10], got 11.0"),
        ({"learning_rate": float("nan")}, "learning rate must be a finite number, got nan"),
        ({"learning_rate": "0.1"}, "learning rate must be a finite number, got '0.1'"),
        ({"epochs": 0}, "epochs must be between 1 and 10000, got 0"),
        ({"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
        ({"epochs": True}, "epochs must be a whole number, got True"),
        ({"batch_size": 0}, "batch size must be between 1 and 1000000, got 0"),
        ({"batch_size": -3}, "batch size must be between 1 and 1000000, got -3"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of adam, sgd, got 'rmsprop'"),
    ],
)
def test_bad_mini_batch_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"learning_rate": 0.01, "epochs": 5, "batch_size": 16}
    fields.update(kwargs)
    with pytest.raises(ValueError) as err:
        MiniBatch(**fields)
    assert str(err.value) == message


def test_training_with_an_explicit_setting_and_the_default(trainer: CustomModelTrainer) -> None:
    fill(trainer, 60)
    with pytest.raises(ValueError, match="optimization must be a MiniBatch or None, got dict"):
        trainer.train_intent_classifier(optimization={"epochs": 1})
    assert trainer.versions() == []
    default = trainer.train_intent_classifier()
    assert default["success"] and default["optimization"] == "lbfgs"
    chosen = trainer.train_intent_classifier(optimization=MiniBatch(0.05, 20, 16, "sgd"))
    assert chosen["success"] and chosen["optimization"] == "sgd lr=0.05 epochs=20 batch=16"
    assert [v["version"] for v in trainer.versions()] == [1, 2]


def test_temperature_scaling_lowers_validation_nll() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4))
    y = [("a", "b")[int(v > 0)] for v in x[:, 0] + rng.normal(size=200)]
    head = fit_head(x[:100], y[:100], ["a", "b"])
    head.weights *= 8.0  # overconfident
    head.bias *= 8.0

    def nll(h: IntentHead) -> float:
        p = h.proba(x[100:])
        idx = [h.classes.index(c) for c in y[100:]]
        return -float(np.mean(np.log(p[np.arange(100), idx])))

    before = nll(head)
    head.temperature, head.threshold = calibrate(head, x[100:], y[100:])
    assert head.temperature > 1.0
    assert nll(head) < before


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_body_rows_are_unit_or_zero(texts: list[str]) -> None:
    out = HashedNgramBody(buckets=256).embed(texts)
    norms = np.linalg.norm(out, axis=1)
    for text, norm in zip(texts, norms, strict=True):
        has_words = bool(tokenize(text))  # common.text's words (NFKC, letters/marks/numbers)
        assert norm == pytest.approx(1.0 if has_words else 0.0, abs=1e-5)


def test_head_round_trips_without_pickle() -> None:
    head = IntentHead(["a", "b"], np.ones((3, 2)), np.zeros(2), 1.5, 0.4, "body")
    back = IntentHead.from_bytes(head.to_bytes())
    assert back.classes == ["a", "b"] and back.temperature == 1.5 and back.body == "body"
    np.testing.assert_array_equal(back.weights, head.weights)


def test_templates_bandit_converges_to_the_best_rated(
    trainer: CustomModelTrainer,
) -> None:
    fill(trainer, 60)
    trainer.train_intent_classifier()
    templates = ResponseTemplates("tia", store=trainer.store, trainer=trainer, seed=0)
    truth = {"Done.": 2.0, "Done, see you then.": 3.0, "Booked it for you.": 4.6}
    ids = {templates.add("schedule_meeting", text, 3): text for text in truth}
    # fill() rated the seed's response 5 once: it is a template too, a mediocre one in truth.
    (seeded,) = [t for t in templates.templates("schedule_meeting") if t[0] not in ids]
    ids[seeded[0]] = seeded[1]
    truth[seeded[1]] = 2.5
    rng = np.random.default_rng(0)
    shown: list[str] = []
    for _ in range(300):
        s = templates.suggest_response("Set up a call with Tom")
        assert s is not None and s.intent == "schedule_meeting"
        shown.append(s.text)
        rating = int(np.clip(np.rint(truth[ids[s.template_id]] + rng.normal(0, 0.7)), 1, 5))
        templates.rate_template(s.template_id, rating)
    last = Counter(shown[-100:])
    assert last["Booked it for you."] >= 80
    # With no personal model every query is unknown: no template is forced on it.
    other = ResponseTemplates("una", store=UserStore("una", home=trainer.store.paths.home))
    assert other.suggest_response("Set up a call with Tom") is None
    with pytest.raises(ValueError, match="rating must be"):
        templates.rate_template(1, 7)


def test_shipped_body_is_small_and_embeds_to_unit_vectors() -> None:
    from client.assistant.bodies import SHIPPED_BODY, FastTextBody, fasttext_body, load_body

    assert SHIPPED_BODY.stat().st_size <= 5 * 1024 * 1024
    body = load_body(SHIPPED_BODY)
    assert len(body.intents) == 150
    out = body.embed(["book a table for two", "what's my balance", "!!!"])
    assert out.shape == (3, body.embedding.shape[1])
    np.testing.assert_allclose(np.linalg.norm(out[:2], axis=1), 1.0, rtol=1e-5)
    assert not out[2].any()  # no words: the zero vector, not NaN
    # The plain reference: mean of the rows of each feature's bucket, then normalized.
    from common.text import feature_strings, fnv1a_32

    feats = feature_strings("book a table", body.features.char_min, body.features.char_max)
    rows = [fnv1a_32(f.encode()) % body.features.buckets for f in feats]
    ref = body.embedding[rows].mean(axis=0)
    np.testing.assert_allclose(
        body.embed(["book a table"])[0], ref / np.linalg.norm(ref), rtol=1e-4, atol=1e-6
    )
    assert isinstance(fasttext_body(Path("/nonexistent")), FastTextBody)


def test_idf_weights_count_each_bucket_once_per_text() -> None:
    from client.assistant.bodies import idf_weights
    from common.text import TextFeatures, feature_strings, fnv1a_32

    texts = ["book a table", "book book a flight", "what's my balance", "", "!!!"]
    features = TextFeatures(buckets=97)
    got = idf_weights(texts, features)
    # The plain reference: the set of each text's buckets, counted over texts.
    df = [0] * features.buckets
    for text in texts:
        strings = feature_strings(text, features.char_min, features.char_max)
        for bucket in {fnv1a_32(f.encode()) % features.buckets for f in strings}:
            df[bucket] += 1
    want = [math.log((1 + len(texts)) / (1 + d)) + 1 for d in df]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.shape == (97,) and got.max() == pytest.approx(math.log(6) + 1)


def test_a_federated_body_on_the_device_wins_over_the_shipped_one(tmp_path: Path) -> None:
    from client.assistant.bodies import device_body_path, fasttext_body, load_body, save_body
    from common.text import TextFeatures

    emb = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    save_body(device_body_path(tmp_path), emb, TextFeatures(buckets=64), ["a", "b"])
    body = fasttext_body(tmp_path)
    assert body is not None
    assert body.name == load_body(device_body_path(tmp_path)).name
    assert body.embed(["hello"]).shape == (1, 8)


def test_trainer_runs_on_the_fasttext_body_when_given(tmp_path: Path) -> None:
    from client.assistant.bodies import fasttext_body

    body = fasttext_body(tmp_path)
    assert body is not None
    t = CustomModelTrainer("ftb", store=UserStore("ftb", home=tmp_path), body=body)
    fill(t, 100)
    result = t.train_intent_classifier()
    assert result["success"] and result["body"] == body.name
    assert t.predict_intent("Set up a call with Sarah") == "schedule_meeting"
    # A head trained on one body refuses to run on another the caller chose...
    other = CustomModelTrainer("ftb", store=t.store, body=HashedNgramBody())
    with pytest.raises(RuntimeError, match="trained on body"):
        other.predict_intent("Set up a call with Sarah")
    # ...while the default body retrains the head from the stored examples.
    default = CustomModelTrainer("ftb", store=t.store)
    assert default.predict_intent("Set up a call with Sarah") == "schedule_meeting"
    assert default.active_head().body == default.body.name != body.name
    assert default.body.name == f"hashed-ngrams-v2*1+{body.name}*0.5"
    t.close()


def test_ngram_body_uses_the_federated_models_tokenizer_and_hash() -> None:
    """One tokenizer and hash on the device: the body's buckets are common.text's FNV-1a ids."""
    from common.text import PAD, TextFeatures, feature_strings, featurize, fnv1a_32

    text = "Wie spät ist es in Zürich? \uff34\uff29\uff2d\uff25 please"  # NFKC: TIME
    vec = HashedNgramBody().embed([text])[0]
    ids = featurize([text], TextFeatures(buckets=4096))[0]
    assert set(np.flatnonzero(vec)) == {int(i) for i in ids if i != PAD}
    # And the plain reference: FNV-1a of each feature string, modulo the buckets.
    plain = Counter(fnv1a_32(f.encode()) % 4096 for f in feature_strings(text))
    top = max(plain.values())
    assert {b for b, c in plain.items() if c == top} == set(np.flatnonzero(vec == vec.max()))


def test_a_head_of_the_old_crc32_body_is_retrained_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    store = UserStore("legacy", home=tmp_path)
    old = CustomModelTrainer("legacy", store=store, body=HashedNgramBody(name="hashed-ngrams-v1"))
    fill(old, 120)
    assert old.train_intent_classifier()["body"] == "hashed-ngrams-v1"
    new = CustomModelTrainer("legacy", store=store)
    text, intent = examples(1, seed=77)[0]
    assert new.predict_intent(text) == intent
    versions = new.versions()
    assert [v["body"] for v in versions] == ["hashed-ngrams-v1", new.body.name]
    assert new.active_head().body == new.body.name
    store.close()


def _small_stack() -> tuple[FastTextBody, StackedBody]:
    """Hashed n-grams beside a small random fastText body at half weight (as the default)."""

    emb = np.random.default_rng(3).normal(size=(512, 16)).astype(np.float32)
    ft = FastTextBody(emb, TextFeatures(buckets=512), "ft-test")
    return ft, StackedBody((HashedNgramBody(buckets=256), ft), (1.0, 0.5))


def test_prototype_prior_scores_cosine_to_the_intents_body_centroid() -> None:
    from client.assistant.intents import pretrained_columns, prototype_prior

    ft, stack = _small_stack()
    pairs = examples(40, seed=5)
    texts, labels = [t for t, _ in pairs], [i for _, i in pairs]
    classes = sorted(set(labels))
    columns = pretrained_columns(stack)
    assert columns == [(slice(256, 272), pytest.approx(0.5 / np.sqrt(1.25)))]
    assert pretrained_columns(HashedNgramBody()) == []
    assert pretrained_columns(StackedBody((HashedNgramBody(), ft), (1.0, 0.0))) == []
    prior = prototype_prior(stack.embed(texts), labels, classes, columns, 2.0)
    assert not prior[:256].any()  # nothing from the n-grams: they were learned nowhere
    # The plain reference: 2 x cosine between the body's vector and each intent's mean.
    raw = ft.embed(texts)
    new = ft.embed(["Set up a call with Sarah", "what's the weather"])
    for j, c in enumerate(classes):
        mean = raw[[i for i, y in enumerate(labels) if y == c]].mean(axis=0)
        want = 2.0 * new @ mean / np.linalg.norm(mean)
        got = stack.embed(["Set up a call with Sarah", "what's the weather"]) @ prior[:, j]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_head_is_pulled_towards_the_prior_not_towards_zero() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5))
    y = [("a", "b")[int(v > 0)] for v in x[:, 0]]
    prior = rng.normal(size=(5, 2))
    # A penalty so strong that the data cannot move the weights: they stay at the prior.
    held = fit_head(x, y, ["a", "b"], l2=1e6, prior=prior)
    np.testing.assert_allclose(held.weights, prior, atol=1e-3)
    assert np.abs(fit_head(x, y, ["a", "b"], l2=1e6).weights).max() < 1e-3
    with pytest.raises(ValueError, match="prior shape"):
        fit_head(x, y, ["a", "b"], prior=np.zeros((4, 2)))


def test_the_body_joins_as_a_centroid_expert_beside_the_ngram_head() -> None:
    from client.assistant.intents import fit_with_prototypes, pretrained_columns

    ft, stack = _small_stack()
    pairs = examples(60, seed=7)
    texts, labels = [t for t, _ in pairs], [i for _, i in pairs]
    classes = sorted(set(labels))
    head = fit_with_prototypes(stack.embed(texts), labels, classes, pretrained_columns(stack), 1.5)
    # The n-gram part is the head fitted on the n-grams alone (from scratch), exactly...
    ngrams = HashedNgramBody(buckets=256)
    scratch = fit_head(ngrams.embed(texts), labels, classes)
    new = ["Set up a call with Sarah", "what's the weather", "play some jazz"]
    raw = ft.embed(texts)
    centroids = np.stack(
        [raw[[i for i, y in enumerate(labels) if y == c]].mean(0) for c in classes]
    )
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    want = scratch.logits(ngrams.embed(new)) + 1.5 * ft.embed(new) @ centroids.T
    # ...plus 1.5 x the cosine to each intent's centroid in the body.
    np.testing.assert_allclose(head.logits(stack.embed(new)), want, rtol=1e-3, atol=1e-3)
    # Warm start from that head lands on the same optimum.
    again = fit_with_prototypes(
        stack.embed(texts), labels, classes, pretrained_columns(stack), 1.5, warm=head
    )
    np.testing.assert_allclose(again.weights, head.weights, atol=1e-3)
    # Scale 0: the plain head on every column, the body's as linear features.
    plain = fit_with_prototypes(stack.embed(texts), labels, classes, pretrained_columns(stack), 0)
    np.testing.assert_allclose(
        plain.weights, fit_head(stack.embed(texts), labels, classes).weights, atol=1e-6
    )


def test_prior_scale_threshold_and_temperature_are_chosen_on_validation() -> None:
    from client.assistant.intents import (
        PRIOR_SCALES,
        fit_with_prototypes,
        pretrained_columns,
        train_head,
        validation_nll,
    )

    _ft, stack = _small_stack()
    pairs = examples(80, seed=6)
    texts, labels = [t for t, _ in pairs], [i for _, i in pairs]
    _h, default = train_head(stack, texts, labels)
    assert default["prior_scale"] == PRIOR_SCALES[0] == 2.0
    head, metrics = train_head(stack, texts, labels, prior_scales=(0.0, 1.0, 4.0))
    losses = metrics["prior_validation_nll"]
    assert set(losses) == {"0", "1", "4"}
    assert metrics["prior_scale"] == float(min(losses, key=lambda k: losses[k]))
    # The same choice, temperature and threshold, redone by hand from the 80/20 split only.
    x = stack.embed(texts)
    classes = sorted(set(labels))
    train, val = stratified_split(labels, 0.2, 0)
    tr, va = [labels[i] for i in train], [labels[i] for i in val]
    for scale in (0.0, 1.0, 4.0):
        fitted = fit_with_prototypes(x[train], tr, classes, pretrained_columns(stack), scale)
        temperature, threshold = calibrate(fitted, x[val], va)
        assert validation_nll(fitted, x[val], va, temperature) == pytest.approx(
            losses[f"{scale:g}"], abs=1e-3
        )
        if scale == metrics["prior_scale"]:
            assert (head.temperature, head.threshold) == pytest.approx((temperature, threshold))
    # A body with nothing pretrained fits once, with no prior.
    _h, plain = train_head(HashedNgramBody(buckets=256), texts, labels)
    assert plain["prior_scale"] == 0.0 and set(plain["prior_validation_nll"]) == {"0"}
    for bad, message in (((), "at least one"), ((-1.0,), r"in \[0, 100\]"), (("1",), "numbers")):
        with pytest.raises(ValueError, match=message):
            train_head(stack, texts, labels, prior_scales=bad)  # type: ignore[arg-type]
