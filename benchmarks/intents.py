"""The intent workload (issue 13's figures): central, federated, personalized and private.

    python benchmarks/intents.py                          # every part (hours on 2 cores)
    python benchmarks/intents.py --parts central          # central accuracy and oos-threshold
    python benchmarks/intents.py --parts overhead         # dp_sgd_overhead
    python benchmarks/intents.py --parts fed100           # 100 devices, and personalization
    python benchmarks/intents.py --parts fed1000          # 1,000 devices
    python benchmarks/intents.py --parts dp --dp-epsilons 1,3,8   # user-level DP, 1,000 devices
        # (--dp-buckets/--dp-dim: a smaller model for the DP runs; `dp_reference` is the same
        # model and rounds without DP, what their accuracy is compared with)
    python benchmarks/intents.py --parts none --simulate-report R.json  # fold in a real run

Each run updates --results (benchmarks/results/intents.json: the parts not run
are kept), redraws the accuracy-epsilon plot (docs/intents_dp.png) when there
are DP figures, and prints the whole record as one JSON line.

central: the model (`fasttext`, defaults: 8192 buckets, dim 48, char 3-5
grams) trained in one process on the 15,000 in-scope training queries (Adam,
lr --lr, batch 32, --epochs epochs; the epoch with the best validation
accuracy is kept), then scored on the 4,500 in-scope test queries:
`accuracy` is plain 150-way accuracy; `oos_threshold` follows Larson et al.
(2019, section 3.2): a query whose top softmax probability is below a
threshold is called out-of-scope, the threshold being the one that maximizes
accuracy over the validation set with its 100 out-of-scope queries treated as
a 151st class; then `in_scope_accuracy` counts in-scope test queries both
classified right and kept, and `oos_recall` the share of the 1,000
out-of-scope test queries rejected. Larson et al.'s Table 2 gives, for
oos-threshold on the full set, in-scope accuracy / OOS recall: FastText
88.6 / 28.3, SVM 88.2 / 18.0, CNN 90.9 / 30.9, MLP 93.4 / 49.1, BERT 96.2 / 52.3.

fed100, fed1000, dp: federated training over N simulated CLINC150 users
(`client.datasource.SimulatedShard`: a Dirichlet(0.5) mix over the intents,
a fifth of each user's queries kept as its held-out data), in one process
(`federated`). Real code: each device's local training
(`client.training.train_local`, FedRep's `client.personal.train_fedrep`
with personalization), its secure-aggregation encoding
(`common.quantize.FixedPoint.encode`: L2 clip, example weight, stochastic
rounding to 32-bit fixed point, and under DP the device's own Skellam
noise), the round's encoding as the coordinator sizes it
(`FixedPoint.for_round` with `xeno.simulation.INTENTS_SECAGG_CLIP_NORM` and
the server's max weight 1000; under DP `UserDpPolicy.fixed_point`), the
noise the server derives from the target epsilon
(`server.privacy.noise_for_target`, the function behind `--dp distributed
--dp-target-epsilon E --dp-clip-norm C`), the decoding and mean the server
takes, the server strategy (`server.strategies.make_strategy(...)
.aggregate_fit`) and the ledger's accountant (`common.privacy.epsilon_of`
of the rounds' `UserDpPolicy.spend`: the printed epsilon). Not run: the
SecAgg+ protocol's key agreement, masking and unmasking, and gRPC. Its
pairwise and self masks cancel exactly modulo 2^32, so the uint32 sum of the
encodings taken here is bit for bit the sum the server unmasks (it differs
from the exact sum of the clipped, weighted updates by less than
`quantization_error_bound` per coordinate, with mean zero). Under DP every
device's noise is sized so that any `min_contributors` (90% of the cohort:
room for SecAgg+ dropouts) of them carry the accounted noise. `accuracy` is
the global model's in-scope accuracy on the 4,500 test queries.
Personalization (fed100): at the final model every user runs the device's
FedRep first step (`client.personal.personalize`: the global head
fine-tuned on its own training queries, the body frozen) and scores the
global and the personalized model on its own held-out queries; the means
over users and the paired difference's 95% interval are reported. The
`personalization` part instead trains with FedRep throughout.

dp_sgd_overhead: time of one local epoch over the whole training split,
batch --batch-size (32), with DP-SGD as devices run it (`client.training.train_local_dp`:
Poisson sampling, Opacus's optimizer and accountant, the clipped sum from
`PackedFastText`'s one pass) over the plain loop of `train_local`, medians of
--repeats, alternating the two, setup excluded. Both are the process's CPU
time (`time.process_time`, one torch thread), not wall time, so that other
processes' load on a shared machine does not enter the ratio.
`hooks_ratio`: the same for Opacus's own `hooks` per-sample gradients, on
the first 1,000 examples only (it takes about a minute per epoch of the
full split).

Round seconds and bytes per device of the real system come from `xeno-fl
simulate --report` runs folded in with --simulate-report; `peak_memory_mb`
is this benchmark's own peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from common.data import Dataset
from common.data.clinc150 import load_clinc150
from common.models import FastText
from common.tensors import load_flat_into_module
from common.text import featurize


@torch.no_grad()
def _probabilities(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    out = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    model.train()
    return out


def oos_threshold(
    val_probs: np.ndarray, val_labels: np.ndarray, oos_val_probs: np.ndarray
) -> float:
    """The threshold maximizing validation accuracy with out-of-scope as one more class."""
    candidates = np.unique(np.concatenate([val_probs.max(1), oos_val_probs.max(1)]))
    val_top, val_pred = val_probs.max(1), val_probs.argmax(1)
    oos_top = oos_val_probs.max(1)
    right = val_pred == val_labels
    # Threshold t: in-scope query right iff classified right and top >= t; OOS right iff top < t.
    kept_right = np.array([(right & (val_top >= t)).sum() for t in candidates])
    rejected = np.searchsorted(np.sort(oos_top), candidates, side="left")
    best = int(np.argmax(kept_right + rejected))
    return float(candidates[best])


def central(epochs: int, lr: float, seed: int) -> dict[str, Any]:
    data = load_clinc150()
    torch.manual_seed(seed)
    model = FastText()
    feats = model.features
    started = time.perf_counter()
    x_train = featurize(data.train.texts, feats)
    x_val, x_test = featurize(data.val.texts, feats), featurize(data.test.texts, feats)
    x_oos_val, x_oos_test = featurize(data.oos_val, feats), featurize(data.oos_test, feats)
    featurize_s = time.perf_counter() - started
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(data.train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_val, best_state, per_epoch = -1.0, copy.deepcopy(model.state_dict()), []
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(yt))
        for s in range(0, len(yt), 32):
            idx = order[s : s + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
        val_acc = float((_probabilities(model, x_val).argmax(1) == data.val.labels).mean())
        per_epoch.append(round(val_acc, 4))
        if val_acc > best_val:
            best_val, best_state = val_acc, copy.deepcopy(model.state_dict())
    train_s = time.perf_counter() - started
    model.load_state_dict(best_state)
    test_probs = _probabilities(model, x_test)
    threshold = oos_threshold(
        _probabilities(model, x_val), data.val.labels, _probabilities(model, x_oos_val)
    )
    kept = test_probs.max(1) >= threshold
    right = test_probs.argmax(1) == data.test.labels
    oos_rejected = _probabilities(model, x_oos_test).max(1) < threshold
    return {
        "accuracy": float(right.mean()),
        "oos_threshold": {
            "threshold": threshold,
            "in_scope_accuracy": float((right & kept).mean()),
            "oos_recall": float(oos_rejected.mean()),
        },
        "val_accuracy_per_epoch": per_epoch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "featurize_s": round(featurize_s, 2),
        "train_s": round(train_s, 1),
    }


def dp_sgd_overhead(repeats: int, batch_size: int = 32) -> dict[str, float]:
    from client.training import DpSgdSettings, LocalTrainingConfig, train_local_dp
    from common.tensors import flatten_state_dict, load_flat_into_module

    data = load_clinc150()
    model = FastText()
    train = Dataset(featurize(data.train.texts, model.features), data.train.labels)
    start = flatten_state_dict(model.state_dict())
    config = LocalTrainingConfig(local_epochs=1, batch_size=batch_size, learning_rate=1.0)

    def plain_epoch(subset: Dataset) -> float:
        # The loop of client.training.train_local, without its closing evaluation.
        load_flat_into_module(model, start)
        x, y = torch.from_numpy(subset.x), torch.from_numpy(subset.y)
        opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
        began = time.process_time()
        order = torch.randperm(len(y))
        for s in range(0, len(y), batch_size):
            idx = order[s : s + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        return time.process_time() - began

    def dp_epoch(module: nn.Module, subset: Dataset) -> float:
        result = train_local_dp(module, start, subset, config, DpSgdSettings(1.0, 1.0))
        return result.metrics["epoch_cpu_seconds"]

    class Unpacked(nn.Module):  # the same network, not a FastText: Opacus's hooks path
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.head = copy.deepcopy(model.embedding), copy.deepcopy(model.head)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embedding(*FastText.bags(x)))  # type: ignore[no-any-return]

    plain_epoch(train), dp_epoch(model, train)  # warm-up
    plain, dp = [], []
    for _ in range(repeats):
        plain.append(plain_epoch(train))
        dp.append(dp_epoch(model, train))
    small = Dataset(train.x[:1000], train.y[:1000])
    hooks = dp_epoch(Unpacked(), small)
    small_plain = statistics.median(plain_epoch(small) for _ in range(3))
    return {
        "plain_epoch_s": statistics.median(plain),
        "dp_sgd_epoch_s": statistics.median(dp),
        "ratio": statistics.median(dp) / statistics.median(plain),
        "hooks_ratio": hooks / small_plain,
    }


def federated(
    users: int,
    rounds: int,
    cohort: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    strategy: str,
    server_lr: float | None,
    seed: int,
    dp_epsilon: float = 0.0,
    dp_clip: float = 1.0,
    dp_delta: float = 1e-6,
    dp_min_fraction: float = 0.9,
    personalization: bool = False,
    score_personal: bool = False,
    personal_epochs: int = 5,
    personal_lr: float = 0.5,
    eval_every: int = 5,
    dim: int = 0,
    optimizer: str = "adam",
    buckets: int = 0,
    lr_schedule: str = "constant",
    lr_final: float = 0.0,
    lr_hold: int = 0,
    late_epochs: int = 0,
    late_from: int = 0,
) -> dict[str, Any]:
    """Federated training over simulated CLINC150 users in one process, as the system runs it.

    Real parts: each device's local training (`client.training.train_local`, or
    `client.personal.train_fedrep` with personalization), its secure-aggregation
    encoding (`common.quantize.FixedPoint.encode`: clip, weight, stochastic
    rounding, and with DP the device's own Skellam noise), the round's fixed
    point as the coordinator sizes it (`FixedPoint.for_round` with
    INTENTS_SECAGG_CLIP_NORM and the server's max weight, or the DP policy's
    `UserDpPolicy.fixed_point`), the noise the server derives from the target
    epsilon (`server.privacy.noise_for_target`), the server strategy
    (`server.strategies.make_strategy(...).aggregate_fit`) and the ledger's
    accountant (`common.privacy.epsilon_of` of the round's `UserDpPolicy.spend`).
    What is not run is the SecAgg+ protocol itself: its pairwise and self masks
    cancel exactly modulo 2^32, so the uint32 sum of the encodings taken here
    is bit for bit the sum the server unmasks (it then differs from the exact
    sum of the clipped, weighted updates by less than `error_bound`).
    """
    from client.datasource import SimulatedShard
    from client.personal import personalize, train_fedrep
    from client.training import LocalTrainingConfig, train_local
    from common.privacy import epsilon_of
    from common.quantize import FixedPoint, centered
    from common.tasks import TaskName, TextShard
    from common.tensors import flatten_state_dict
    from server.privacy import UserDpMechanism, UserDpPolicy, noise_for_target
    from server.rounds.coordinator import RoundConfig
    from server.strategies import FitInstructions, make_strategy
    from xeno.simulation import INTENTS_SECAGG_CLIP_NORM

    if not 1 <= cohort <= users:
        raise ValueError("--cohort must be in 1..users")
    rates = [client_lr(lr_schedule, lr, lr_final, lr_hold, rounds, r) for r in range(rounds)]
    torch.manual_seed(seed)
    size = {"buckets": buckets, "dim": dim}
    model = FastText(**{k: v for k, v in size.items() if v})
    feats = model.features
    data = load_clinc150()
    x_test = featurize(data.test.texts, feats)
    shards = []
    for u in range(users):
        loaded = SimulatedShard(TaskName.INTENTS, u, users, alpha=0.5, seed=seed).load()
        assert isinstance(loaded.train, TextShard) and isinstance(loaded.heldout, TextShard)
        shards.append((loaded.train.featurized(feats), loaded.heldout.featurized(feats)))
    weights = flatten_state_dict(model.state_dict())
    d = weights.size
    config = LocalTrainingConfig(
        local_epochs=local_epochs, batch_size=batch_size, learning_rate=lr, optimizer=optimizer
    )
    server = make_strategy(strategy, FitInstructions(), server_lr)
    server.initialize(weights)
    max_weight = RoundConfig.secagg_max_weight
    policy = None
    out: dict[str, Any] = {
        "users": users,
        "rounds": rounds,
        "cohort": cohort,
        "local_epochs": local_epochs,
        "learning_rate": lr,
        "learning_rate_schedule": lr_schedule,
        **(
            {}
            if lr_schedule == "constant"
            else {
                "learning_rate_final": lr_final,
                "learning_rate_hold_rounds": lr_hold,
                "learning_rates": rates,
            }
        ),
        **({"late_local_epochs": late_epochs, "late_from_round": late_from} if late_epochs else {}),
        "local_optimizer": optimizer,
        "batch_size": batch_size,
        "strategy": strategy,
        "server_lr": server_lr,
        "buckets": model.embedding.num_embeddings,
        "dim": model.embedding.embedding_dim,
        "parameters": d,
    }
    if dp_epsilon > 0:
        need = max(1, math.ceil(dp_min_fraction * cohort))
        z = noise_for_target(
            UserDpMechanism.DISTRIBUTED, dp_epsilon, rounds, dp_delta, dp_clip, cohort, need, d
        )
        policy = UserDpPolicy(UserDpMechanism.DISTRIBUTED, z, dp_clip, need, dp_delta)
        fp = policy.fixed_point(cohort, d)
        spend = policy.spend(fp)
        out["dp"] = {
            "target_epsilon": dp_epsilon,
            "epsilon": epsilon_of([spend] * rounds, dp_delta),
            "delta": dp_delta,
            "noise_multiplier": z,
            "clip_norm": dp_clip,
            "min_contributors": need,
            "noise_std_of_mean": z * fp.sensitivity / fp.scale / cohort * math.sqrt(cohort / need),
        }
    else:
        fp = FixedPoint.for_round(INTENTS_SECAGG_CLIP_NORM, cohort, max_weight)
        out["secagg_clip_norm"] = INTENTS_SECAGG_CLIP_NORM
    out["quantization_error_bound"] = fp.error_bound(cohort)

    def test_accuracy(vector: np.ndarray) -> float:
        load_flat_into_module(model, vector)
        return float((_probabilities(model, x_test).argmax(1) == data.test.labels).mean())

    choose = np.random.default_rng(seed + 1)
    started = time.perf_counter()
    curve, round_s = [], []
    for r in range(rounds + 1):
        if r % eval_every == 0 or r == rounds:
            curve.append([r, round(test_accuracy(weights), 4)])
            print(
                json.dumps(
                    {
                        "round": r,
                        "accuracy": curve[-1][1],
                        "s": round(time.perf_counter() - started, 1),
                    }
                ),
                file=sys.stderr,
            )
        if r == rounds:
            break
        began = time.perf_counter()
        chosen = np.sort(choose.choice(users, cohort, replace=False))
        config = dataclasses.replace(
            config,
            learning_rate=rates[r],
            local_epochs=late_epochs if late_epochs and r >= late_from else local_epochs,
        )
        total = np.zeros(d + 1, dtype=np.uint32)
        for u in chosen:
            train, heldout = shards[u]
            device_seed = (seed * 1_000_003 + r * users + int(u)) % (1 << 31)
            if personalization:
                result = train_fedrep(
                    model,
                    weights,
                    train,
                    heldout,
                    config,
                    personal_epochs,
                    personal_lr,
                    device_seed,
                ).result
            else:
                result = train_local(model, weights, train, config, device_seed)
            device_rng = np.random.default_rng(device_seed)
            total += fp.encode(result.delta, result.num_examples, device_rng)
        weighted_sum, _ = fp.decode(total)
        if policy is not None:
            weight_sum = float(len(chosen))  # every DP upload weighs 1
        else:
            weight_sum = int(centered(total[-1:])[0]) / max_weight
        mean_delta = (weighted_sum / weight_sum).astype(np.float32)
        weights = server.aggregate_fit(weights, mean_delta)
        round_s.append(time.perf_counter() - began)
    out["accuracy"] = curve[-1][1]
    out["accuracy_curve"] = curve
    out["median_round_wall_s"] = statistics.median(round_s) if round_s else 0.0
    if score_personal:
        # Every user scores the final model and its personalized model on its own held-out
        # queries: the device's FedRep first step (client.personal.personalize).
        global_acc, personal_acc = [], []
        for u, (train, heldout) in enumerate(shards):
            gen = torch.Generator().manual_seed(seed * 7919 + u)
            p = personalize(
                model, weights, train, heldout, config, personal_epochs, personal_lr, gen
            )
            global_acc.append(p.global_correct / len(heldout))
            personal_acc.append(p.personal_correct / len(heldout))
        diff = np.array(personal_acc) - np.array(global_acc)
        half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff))
        out["personalization"] = {
            "method": "fedrep" if personalization else "fedavg, then FedRep's head fine-tuning",
            "personal_epochs": personal_epochs,
            "personal_learning_rate": personal_lr,
            "mean_global_accuracy": float(np.mean(global_acc)),
            "mean_personalized_accuracy": float(np.mean(personal_acc)),
            "personalized_minus_global": float(diff.mean()),
            "personalized_minus_global_95ci": [
                float(diff.mean()) - half,
                float(diff.mean()) + half,
            ],
            "users_personalized_better": int((diff > 0).sum()),
            "users_personalized_worse": int((diff < 0).sum()),
        }
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


LR_SCHEDULES = ("constant", "cosine", "exp")


def client_lr(schedule: str, lr: float, final: float, hold: int, rounds: int, r: int) -> float:
    """The devices' rate in round r (0-based) of `rounds`: lr for the first `hold` rounds,
    then down to `final` at the last round by a half cosine ("cosine") or geometrically ("exp").

    A fixed local rate leaves FedAvg at a biased fixed point under non-IID data; a decaying one
    removes that bias (Li et al., ICLR 2020). Measured at 100 devices: README, intents.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown --fed-lr-schedule {schedule!r}; use {', '.join(LR_SCHEDULES)}")
    if schedule != "constant" and not (final > 0 and 0 <= hold < rounds):
        raise ValueError("--fed-lr-final must be positive and --fed-lr-hold in 0..rounds-1")
    if schedule == "constant" or r < hold:
        return lr
    span = rounds - 1 - hold
    t = 1.0 if span <= 0 else min(1.0, (r - hold) / span)
    if schedule == "cosine":
        return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return float(lr * (final / lr) ** t)


FED_DEFAULTS: dict[str, Any] = {
    # Devices: Adam (fresh each round) at 0.03, 5 local epochs, batch 16. Server: FedAvg at
    # rate 2 (the mean of non-IID updates moves each class's head row by only the share of
    # users that hold the class). Measured at 100 devices against Adam 0.1 (a plateau near
    # 60% from round 10: its steps are too coarse), Adam 0.01 (slower: 82.6% at round 16
    # where 0.03 had it at round 12), a 0.9-per-round decay of the local rate (no gain by
    # round 12), FedAvgM 0.7 (slower) and FedAdam over local SGD (chance after 10 rounds).
    "rounds": 30,
    "local_epochs": 5,
    "lr": 0.03,
    "optimizer": "adam",
    "strategy": "fedavg",
    "server_lr": 2.0,
    "cohort_1000": 1000,
    "dp_clip": 1.0,
    "dp_rounds": 12,
    "personal_lr": 0.003,
}

RESULTS = Path(__file__).resolve().parent / "results" / "intents.json"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "intents_dp.png"
PARTS = ("central", "overhead", "fed100", "fed1000", "personalization", "dp")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against user-level epsilon (1,000 devices) beside the non-private figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = results.get("dp", {})
    eps = sorted(float(e) for e in dp)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    if eps:
        acc = [100 * dp[f"{e:g}"]["accuracy"] for e in eps]
        ax.plot(eps, acc, "o-", label="federated, user-level DP (Skellam, SecAgg+)")
        for e, a in zip(eps, acc, strict=True):
            ax.annotate(f"{a:.1f}", (e, a), textcoords="offset points", xytext=(4, -12))
    reference = results.get("dp_reference")
    if reference is not None:
        ax.axhline(
            100 * reference["accuracy"],
            ls="--",
            c="gray",
            label=f"same model and rounds, no DP ({reference['parameters']:,} parameters)",
        )
    central_size = results.get("central", {}).get("parameters")
    if central_size is not None and (reference is None or reference["parameters"] == central_size):
        ax.axhline(
            100 * results["central"]["accuracy"], ls=":", c="black", label="central (one process)"
        )
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 8], labels=["1", "3", "8"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(r"user-level $\varepsilon$ ($\delta = 10^{-6}$)")
    ax.set_ylabel("in-scope test accuracy (%)")
    ax.set_title("CLINC150 intent model, 1,000 simulated devices")
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--users", type=int, default=100, help="users of the personalization part (all per round)"
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)}; the others are kept "
        "from --results",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON read and updated")
    parser.add_argument("--plot", type=Path, default=PLOT, help="accuracy-epsilon PNG")
    parser.add_argument("--epochs", type=int, default=8, help="central epochs")
    parser.add_argument("--lr", type=float, default=0.01, help="central Adam rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="of the overhead measurement")
    parser.add_argument("--rounds", type=int, default=FED_DEFAULTS["rounds"])
    parser.add_argument("--local-epochs", type=int, default=FED_DEFAULTS["local_epochs"])
    parser.add_argument(
        "--fed-lr", type=float, default=FED_DEFAULTS["lr"], help="devices' local learning rate"
    )
    parser.add_argument(
        "--fed-lr-schedule",
        default="constant",
        choices=LR_SCHEDULES,
        help="devices' rate over rounds",
    )
    parser.add_argument(
        "--fed-lr-final", type=float, default=0.003, help="the scheduled rate at the last round"
    )
    parser.add_argument(
        "--fed-lr-hold", type=int, default=0, help="rounds at --fed-lr before the decay"
    )
    parser.add_argument(
        "--late-local-epochs", type=int, default=0, help="local epochs from --late-from (0: off)"
    )
    parser.add_argument("--late-from", type=int, default=0, help="0-based round")
    parser.add_argument("--local-optimizer", default=FED_DEFAULTS["optimizer"])
    parser.add_argument("--fed-batch-size", type=int, default=16)
    parser.add_argument("--strategy", default=FED_DEFAULTS["strategy"])
    parser.add_argument("--server-lr", type=float, default=FED_DEFAULTS["server_lr"])
    parser.add_argument(
        "--cohort-1000",
        type=int,
        default=FED_DEFAULTS["cohort_1000"],
        help="devices per round of the 1,000-device runs",
    )
    parser.add_argument("--dp-epsilons", default="1,3,8")
    parser.add_argument("--dp-clip-norm", type=float, default=FED_DEFAULTS["dp_clip"])
    parser.add_argument("--dp-rounds", type=int, default=FED_DEFAULTS["dp_rounds"])
    parser.add_argument(
        "--dp-buckets", type=int, default=0, help="the DP runs' model buckets (0: the default)"
    )
    parser.add_argument("--dp-dim", type=int, default=0, help="the DP runs' model dim (0: default)")
    parser.add_argument("--personal-epochs", type=int, default=5, help="FedRep head epochs")
    parser.add_argument(
        "--personal-lr", type=float, default=FED_DEFAULTS["personal_lr"], help="FedRep head rate"
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--simulate-report",
        type=Path,
        action="append",
        default=[],
        help="fold in a `xeno-fl simulate --report` JSON (the real system's round seconds, "
        "bytes per device and accuracy); may repeat",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS) - {"none"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    out: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    common = {
        "local_epochs": args.local_epochs,
        "lr": args.fed_lr,
        "batch_size": args.fed_batch_size,
        "strategy": args.strategy,
        "server_lr": args.server_lr,
        "seed": args.seed,
        "optimizer": args.local_optimizer,
        "eval_every": args.eval_every,
        "lr_schedule": args.fed_lr_schedule,
        "lr_final": args.fed_lr_final,
        "lr_hold": args.fed_lr_hold,
        "late_epochs": args.late_local_epochs,
        "late_from": args.late_from,
    }
    if "central" in parts:
        c = central(args.epochs, args.lr, args.seed)
        out["central"] = c
        out["oos"] = c["oos_threshold"]
    if "overhead" in parts:
        overhead = dp_sgd_overhead(args.repeats, args.batch_size)
        out["dp_sgd_overhead"] = overhead["ratio"]
        out["dp_sgd_epoch_seconds"] = overhead
        out["batch_size"] = args.batch_size
    if "fed100" in parts:
        # The final model's personalization too: every user's FedRep head fine-tuning of it.
        out["fed100"] = federated(
            100,
            args.rounds,
            100,
            score_personal=True,
            personal_epochs=args.personal_epochs,
            personal_lr=args.personal_lr,
            **common,
        )
    if "fed1000" in parts:
        out["fed1000"] = federated(1000, args.rounds, args.cohort_1000, **common)
    if "personalization" in parts:
        fedrep = federated(
            args.users,
            args.rounds,
            args.users,
            personalization=True,
            score_personal=True,
            personal_epochs=args.personal_epochs,
            personal_lr=args.personal_lr,
            **common,
        )
        out["personalization"] = fedrep
    if "dp" in parts:
        dp = out.setdefault("dp", {})
        size = {"buckets": args.dp_buckets, "dim": args.dp_dim}
        for eps in (float(e) for e in args.dp_epsilons.split(",")):
            dp[f"{eps:g}"] = federated(
                1000,
                args.dp_rounds,
                args.cohort_1000,
                dp_epsilon=eps,
                dp_clip=args.dp_clip_norm,
                **size,
                **common,
            )
        # The same model and rounds without DP: what the epsilons' accuracy is compared with.
        out["dp_reference"] = federated(1000, args.dp_rounds, args.cohort_1000, **size, **common)
    for report in args.simulate_report:
        sim = json.loads(report.read_text())
        done = [r for r in sim["rounds"] if r["status"] == "completed"]
        # Keyed by the fleet (a 1,000-device fleet selects 100 per round by default).
        clients = sim.get("clients") or max(r["selected"] for r in done)
        out.setdefault("simulation", {})[str(clients)] = {
            "report": str(report),
            "clients_per_round": max(r["selected"] for r in done),
            "rounds": len(done),
            "accuracy": done[-1]["accuracy"],
            "median_round_seconds": statistics.median(r["seconds"] for r in done),
            "bytes_per_device_per_round": statistics.median(
                (r["bytes_in"] + r["bytes_out"]) / max(r["participants"], 1) for r in done
            ),
            "wall_seconds": sim.get("wall_seconds"),
        }
    _summarize(out)
    out["peak_memory_mb"] = max(out.get("peak_memory_mb", 0.0), _peak_rss_mb())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out) + "\n")
    if "dp" in out:
        plot(out, args.plot)
    print(json.dumps(out))


def _summarize(out: dict[str, Any]) -> None:
    """The issue's flat keys, from the parts' records."""
    if "central" in out:
        out["central_accuracy"] = out["central"]["accuracy"]
        out["oos"] = out["central"]["oos_threshold"]
    for key in ("fed100", "fed1000"):
        if key in out:
            out[f"federated_{key[3:]}_accuracy"] = out[key]["accuracy"]
    scored = out.get("personalization", out.get("fed100", {}))
    if "personalization" in scored:
        p = scored["personalization"]
        out["mean_global_accuracy"] = p["mean_global_accuracy"]
        out["mean_personalized_accuracy"] = p["mean_personalized_accuracy"]
    if "dp" in out:
        out["dp_accuracy"] = {e: r["accuracy"] for e, r in out["dp"].items()}
    if "dp_reference" in out:
        out["dp_reference_accuracy"] = out["dp_reference"]["accuracy"]


if __name__ == "__main__":
    main()
