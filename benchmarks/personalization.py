"""How many rated interactions the personalization engine needs to find a user's taste.

    python benchmarks/personalization.py --users 200 --interactions 50

Each simulated user has a hidden true communication style (one of 4) and
detail level (one of 3). Per interaction the assistant asks the engine for a
plan (`plan_response`: Thompson draws from its posteriors), answers with a
response of the planned length, labelled with the planned style in its
context (as the real assistant knows what it generated), and the user rates
it 1-5: 1.8 + 1.2 x [style right] + 1.2 x [detail right] + 0.5 x [detail one
step off] + Gaussian noise (sd --noise, default 0.8), rounded and clipped.
After each interaction the engine's learned style and detail are compared to
the truth. Prints one JSON line: the share of users with both right after
10/20/30/50 interactions, and the median number needed until both stay right.
Each user has a real encrypted store (SQLCipher) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.assistant.personalization import ALLOWED, Dimension, PersonalizationEngine
from client.assistant.store import UserStore

WORDS = {"brief": 30, "medium": 120, "detailed": 320}


def simulate_user(
    index: int, home: Path, interactions: int, noise: float, seed: int
) -> tuple[list[bool], list[bool]]:
    rng = np.random.default_rng([seed, index])
    styles = ALLOWED[Dimension.STYLE]
    details = ALLOWED[Dimension.DETAIL]
    true_style = styles[rng.integers(len(styles))]
    true_detail = details[rng.integers(len(details))]
    engine = PersonalizationEngine(
        f"user{index}", store=UserStore(f"user{index}", home=home), seed=index
    )
    style_ok: list[bool] = []
    detail_ok: list[bool] = []
    try:
        for _ in range(interactions):
            plan = engine.plan_response()
            style, detail = plan[Dimension.STYLE], plan[Dimension.DETAIL]
            response = " ".join(["word"] * WORDS[detail])
            off = abs(details.index(detail) - details.index(true_detail))
            utility = 1.2 * (style == true_style) + (1.2 if off == 0 else 0.5 if off == 1 else 0.0)
            rating = int(np.clip(np.rint(1.8 + utility + rng.normal(0, noise)), 1, 5))
            engine.record_interaction(
                "How do I do this?",
                response,
                {"topic": "general", "style": style},
                user_feedback=rating,
            )
            style_ok.append(engine.get_preference(Dimension.STYLE).value == true_style)
            detail_ok.append(engine.get_preference(Dimension.DETAIL).value == true_detail)
    finally:
        engine.close()
    return style_ok, detail_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--interactions", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("XENO_DEVICE_KEY", "5e" * 32)
    started = time.perf_counter()
    both = np.zeros((args.users, args.interactions), dtype=bool)
    style = np.zeros_like(both)
    detail = np.zeros_like(both)
    with tempfile.TemporaryDirectory() as tmp:
        for u in range(args.users):
            s, d = simulate_user(u, Path(tmp), args.interactions, args.noise, args.seed)
            style[u], detail[u] = s, d
            both[u] = np.logical_and(s, d)
    # Interactions until right from then on (interactions + 1 when never settled).
    settled = np.array(
        [
            next(
                (i + 1 for i in range(args.interactions) if row[i:].all()),
                args.interactions + 1,
            )
            for row in both
        ]
    )
    at = {
        str(n): {
            "both": float(both[:, n - 1].mean()),
            "style": float(style[:, n - 1].mean()),
            "detail": float(detail[:, n - 1].mean()),
        }
        for n in (10, 20, 30, 50)
        if n <= args.interactions
    }
    print(
        json.dumps(
            {
                "users": args.users,
                "interactions": args.interactions,
                "noise_sd": args.noise,
                "share_right_after": at,
                "median_interactions_until_settled": float(np.median(settled)),
                "p90_interactions_until_settled": float(np.percentile(settled, 90)),
                "target_met": bool(args.interactions >= 30 and at["30"]["both"] >= 0.9),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
