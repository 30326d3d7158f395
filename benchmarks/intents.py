"""The intent workload: the fastText-style model on CLINC150, centrally, and its DP-SGD cost.

    python benchmarks/intents.py                  # central accuracy + dp_sgd_overhead
    python benchmarks/intents.py --overhead-only  # dp_sgd_overhead alone

central: the model (`fasttext`, defaults: 8192 buckets, dim 64, char 3-5
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

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
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
            opt.zero_grad(set_to_none=False)
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


def personalization(
    users: int,
    rounds: int,
    local_epochs: int,
    personal_epochs: int,
    lr: float,
    personal_lr: float,
    seed: int,
) -> dict[str, Any]:
    """FedRep over simulated CLINC150 users, in one process: global vs personalized accuracy.

    Every user (Dirichlet(0.5) mix over the intents, `common.tasks`' simulated
    users, each keeping a fifth of their queries held out) runs the device's
    own FedRep round (`client.personal.train_fedrep`) each round, and the
    server takes the example-weighted mean of the updates (FedAvg, no secure
    aggregation: its sum is the same to within the quantization bound).
    After `rounds` rounds, each user scores the final global model and its
    personalized model (the final body under its personal head: the final
    global head fine-tuned, as a device does at the start of a round) on its own held-out
    queries; the means over users are reported, with the paired difference's
    95% interval.
    """
    from client.datasource import SimulatedShard
    from client.personal import train_fedrep
    from client.training import LocalTrainingConfig
    from common.tasks import TaskName
    from common.tensors import flatten_state_dict

    torch.manual_seed(seed)
    model = FastText()
    feats = model.features
    shards = []
    for u in range(users):
        loaded = SimulatedShard(TaskName.INTENTS, u, users, alpha=0.5, seed=seed).load()
        assert loaded.heldout is not None
        shards.append((loaded.train.featurized(feats), loaded.heldout.featurized(feats)))
    weights = flatten_state_dict(model.state_dict())
    config = LocalTrainingConfig(local_epochs=local_epochs, batch_size=32, learning_rate=lr)
    started = time.perf_counter()
    per_round = []
    for r in range(rounds + 1):
        total = np.zeros_like(weights, dtype=np.float64)
        examples = 0
        global_acc, personal_acc = [], []
        for train, heldout in shards:
            out = train_fedrep(
                model,
                weights,
                train,
                heldout,
                config,
                personal_epochs,
                personal_lr,
                seed * 7919 + r,
            )
            global_acc.append(out.result.metrics["heldout_global_accuracy"])
            personal_acc.append(out.result.metrics["heldout_personal_accuracy"])
            total += out.result.num_examples * out.result.delta
            examples += out.result.num_examples
        per_round.append(
            {
                "round": r,
                "global": float(np.mean(global_acc)),
                "personal": float(np.mean(personal_acc)),
            }
        )
        if r < rounds:  # the last pass only scores the final model
            weights = (weights + total / examples).astype(np.float32)
    diff = np.array(personal_acc) - np.array(global_acc)
    half = 1.96 * float(diff.std(ddof=1)) / np.sqrt(len(diff))
    return {
        "users": users,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "personal_epochs": personal_epochs,
        "personal_learning_rate": personal_lr,
        "mean_global_accuracy": float(np.mean(global_acc)),
        "mean_personalized_accuracy": float(np.mean(personal_acc)),
        "personalized_minus_global": [float(diff.mean()) - half, float(diff.mean()) + half],
        "users_personalized_better": int((diff > 0).sum()),
        "per_round": per_round,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="of the overhead measurement")
    parser.add_argument("--overhead-only", action="store_true")
    parser.add_argument(
        "--personalization-only", action="store_true", help="only the FedRep measurement"
    )
    parser.add_argument("--users", type=int, default=100, help="of the FedRep measurement")
    parser.add_argument("--rounds", type=int, default=10, help="of the FedRep measurement")
    parser.add_argument("--local-epochs", type=int, default=2, help="of the FedRep body step")
    parser.add_argument("--personal-epochs", type=int, default=5, help="FedRep head epochs")
    parser.add_argument("--personal-lr", type=float, default=0.5, help="FedRep head SGD rate")
    parser.add_argument("--fed-lr", type=float, default=5.0, help="devices' SGD learning rate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    if not args.overhead_only:
        fedrep = personalization(
            args.users,
            args.rounds,
            args.local_epochs,
            args.personal_epochs,
            args.fed_lr,
            args.personal_lr,
            args.seed,
        )
        out["personalization"] = fedrep
        out["mean_global_accuracy"] = fedrep["mean_global_accuracy"]
        out["mean_personalized_accuracy"] = fedrep["mean_personalized_accuracy"]
        if args.personalization_only:
            print(json.dumps(out))
            return
        out["central"] = central(args.epochs, args.lr, args.seed)
    overhead = dp_sgd_overhead(args.repeats, args.batch_size)
    out["dp_sgd_overhead"] = overhead["ratio"]
    out["dp_sgd_epoch_seconds"] = overhead
    out["batch_size"] = args.batch_size
    print(json.dumps(out))


if __name__ == "__main__":
    main()
