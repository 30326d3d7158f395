"""Personal intents on a pretrained body versus from scratch, on intents the body never saw.

    python benchmarks/personal.py --users 30 --seed 1 --intents-per-user 3,5,10,15

30 of CLINC150's 150 intents (seeded draw) are held out; a body (the
fastText-style intent model's embedding, the recipe of
`scripts/build_intent_body.py`) is trained on the other 120 intents' training
queries. For each value of --intents-per-user, simulated users each own that
many of the 30 unseen intents and 50-200 of their training queries (uniform
draw; the users a value gets do not depend on the other values), and the
personal trainer's recipe (`client.assistant.intents.train_head`: 20%
stratified validation, calibrated L2 logistic head, refit on all) runs on
the same examples in each arm: `scratch`, hashed word and character n-grams
with nothing pretrained; `default`, the trainer's default (n-grams beside the
body at FASTTEXT_WEIGHT, the body joining as a nearest-centroid expert at
PRIOR_SCALES, `fit_with_prototypes`); `no-prior`, the same stack with the
body's columns as linear features only (the recipe before the expert); and
on request `body`, `body+ngrams` and fine-tuning the whole fastText model
(`finetune-body`, `finetune-scratch`). All are scored on the CLINC150 test
queries of the user's intents (30 per intent): `accuracy` is top-1 among the
user's intents; `kept_accuracy` counts only answers above the unknown
threshold as right. Prints one JSON line: per value, per-arm means and
standard deviations over users, and paired differences (arm minus scratch,
default minus no-prior) with their 95% t interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.assistant.bodies import FASTTEXT_WEIGHT, FastTextBody, clinc150_body
from client.assistant.intents import (
    PRIOR_SCALES,
    HashedNgramBody,
    StackedBody,
    TextBody,
    train_head,
)
from common.data.clinc150 import load_clinc150
from common.models import FastText
from common.text import TextFeatures, featurize


def score(
    body: TextBody,
    texts: list[str],
    labels: list[str],
    test: list[tuple[str, str]],
    prior_scales: tuple[float, ...] = PRIOR_SCALES,
) -> dict[str, float]:
    head, metrics = train_head(body, texts, labels, prior_scales=prior_scales)
    p = head.proba(body.embed([t for t, _ in test]))
    best = p.argmax(axis=1)
    right = np.array([head.classes[j] == y for j, (_, y) in zip(best, test, strict=True)])
    kept = p.max(axis=1) >= head.threshold
    return {
        "accuracy": float(right.mean()),
        "kept_accuracy": float((right & kept).mean()),
        "validation_accuracy": float(metrics["accuracy"]),
        "prior_scale": float(metrics["prior_scale"]),
    }


def finetune(
    init: np.ndarray | None,
    features: TextFeatures,
    texts: list[str],
    labels: list[str],
    test: list[tuple[str, str]],
    epochs: int,
    seed: int,
) -> float:
    """The whole fastText model trained on the user's examples; test accuracy.

    `init`: the body's embedding to start from, or None for a random start
    (fastText's own initialization): the same architecture and recipe either way.
    """
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    torch.manual_seed(seed)
    model = FastText(features.buckets, 64, len(classes), features.char_min, features.char_max)
    if init is not None:
        with torch.no_grad():
            model.embedding.weight.copy_(torch.from_numpy(init))
    x = torch.from_numpy(featurize(texts, features))
    y = torch.tensor([index[c] for c in labels])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 32):
            idx = order[s : s + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        pred = model(torch.from_numpy(featurize([t for t, _ in test], features))).argmax(1)
    return float(np.mean([classes[int(p)] == c for p, (_, c) in zip(pred, test, strict=True)]))


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4)}


def paired(a: list[float], b: list[float]) -> dict[str, object]:
    """Mean of a - b over users with its 95% t interval; users won and tied."""
    diff = np.array(a) - np.array(b)
    half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
    mean = float(diff.mean())
    return {
        "mean": round(mean, 4),
        "ci95": [round(mean - half, 4), round(mean + half, 4)],
        "users_where_it_wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--heldout-intents", type=int, default=30)
    parser.add_argument(
        "--intents-per-user",
        default="5",
        help="comma-separated: one set of users per value, all on the same body (3,5,10,15)",
    )
    parser.add_argument("--min-examples", type=int, default=50)
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arms",
        default="default,scratch,no-prior",
        help="comma-separated arms to run (scratch is always run: the reference); also "
        "body, body+ngrams, finetune-body, finetune-scratch",
    )
    args = parser.parse_args()
    per_user = [int(v) for v in str(args.intents_per_user).split(",")]
    args.arms += ",scratch"
    started = time.perf_counter()
    data = load_clinc150()
    rng = np.random.default_rng(args.seed)
    held = sorted(rng.choice(len(data.intents), args.heldout_intents, replace=False).tolist())
    held_names = [data.intents[i] for i in held]
    embedding, features, trained_on = clinc150_body(
        exclude=held_names, epochs=args.epochs, seed=args.seed
    )
    assert not set(trained_on) & set(held_names)
    body = FastTextBody(embedding, features, "fasttext-120", trained_on)
    scratch = HashedNgramBody()
    body_s = time.perf_counter() - started
    # The trainer's default (client.assistant.bodies.default_body): the n-grams with the
    # body beside them at FASTTEXT_WEIGHT, the prototype prior's scale chosen on validation.
    stacked = StackedBody((scratch, body), (1.0, FASTTEXT_WEIGHT))
    everything: dict[str, tuple[TextBody, tuple[float, ...]]] = {
        "body": (body, PRIOR_SCALES),
        "scratch": (scratch, PRIOR_SCALES),  # no pretrained columns: no prior
        "body+ngrams": (StackedBody((body, scratch)), PRIOR_SCALES),
        "default": (stacked, PRIOR_SCALES),
        # The same body without the prior: the trainer's recipe before the prior.
        "no-prior": (stacked, (0.0,)),
    }
    wanted = set(args.arms.split(","))
    bodies = {k: v for k, v in everything.items() if k in wanted}
    finetunes = [a for a in ("finetune-body", "finetune-scratch") if a in wanted]
    torch.set_num_threads(1)
    results = {}
    for k in per_user:
        # Each value draws its users as a run with that value alone would (same seed).
        rng = np.random.default_rng(args.seed)
        rng.choice(len(data.intents), args.heldout_intents, replace=False)
        arms: dict[str, dict[str, list[float]]] = {
            name: {"accuracy": [], "kept_accuracy": [], "validation_accuracy": []}
            for name in bodies
        }
        for a in finetunes:
            arms[a] = {"accuracy": []}
        sizes = []
        for _ in range(args.users):
            mine = rng.choice(held, k, replace=False)
            pool = np.flatnonzero(np.isin(data.train.labels, mine))
            n = int(rng.integers(args.min_examples, args.max_examples + 1))
            picked = rng.choice(pool, min(n, len(pool)), replace=False)
            texts = [data.train.texts[i] for i in picked]
            labels = [data.intents[data.train.labels[i]] for i in picked]
            test_rows = np.flatnonzero(np.isin(data.test.labels, mine))
            test = [(data.test.texts[i], data.intents[data.test.labels[i]]) for i in test_rows]
            sizes.append(len(texts))
            for name, (b, scales) in bodies.items():
                for key, v in score(b, texts, labels, test, scales).items():
                    arms[name].setdefault(key, []).append(v)
            for name, init in (("finetune-body", embedding), ("finetune-scratch", None)):
                if name not in arms:
                    continue
                acc = finetune(init, features, texts, labels, test, args.finetune_epochs, args.seed)
                arms[name]["accuracy"].append(acc)
        results[str(k)] = {
            "examples_per_user": summary([float(s) for s in sizes]),
            "arms": {a: {m: summary(v) for m, v in ms.items()} for a, ms in arms.items()},
            "minus_scratch_accuracy": {
                a: paired(arms[a]["accuracy"], arms["scratch"]["accuracy"])
                for a in ("default", "no-prior", "body", "body+ngrams", "finetune-body")
                if a in arms
            },
            "default_minus_no_prior_accuracy": (
                paired(arms["default"]["accuracy"], arms["no-prior"]["accuracy"])
                if "default" in arms and "no-prior" in arms
                else None
            ),
            "finetune_body_minus_finetune_scratch": (
                paired(arms["finetune-body"]["accuracy"], arms["finetune-scratch"]["accuracy"])
                if len(finetunes) == 2
                else None
            ),
        }
    print(
        json.dumps(
            {
                "seed": args.seed,
                "users": args.users,
                "heldout_intents": args.heldout_intents,
                "prior_scales": list(PRIOR_SCALES),
                "by_intents_per_user": results,
                "body_train_seconds": round(body_s, 1),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
