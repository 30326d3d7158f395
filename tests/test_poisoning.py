"""Model poisoning by one of ten devices: FedAvg collapses, median and trimmed mean hold.

In process, without gRPC (the statistical part; `benchmarks/poisoning.py` runs the
same attack over real gRPC): ten devices train the digits MLP with the real
local-training code on a near-IID split (Dirichlet alpha = 100, the setting of
Yin et al.'s guarantees), and device 0 replaces its update with 100 x itself
(scaled) or -10 x itself (sign-flipped). Aggregation is the strategies' own code,
FedAvg weighting by example counts as the coordinator does. Fully seeded, so the
figures are the same on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import LocalTrainingConfig, train_local
from common.data import federated_digits
from common.evaluation import evaluate
from common.models import ModelSpec, build_model
from common.tensors import flatten_state_dict, load_flat_into_module
from server.strategies import RobustStrategy, make_strategy

ROUNDS = 8
ATTACKS = {"scaled": 100.0, "sign-flipped": -10.0}


def federate(strategy_name: str, attack: str | None, rounds: int = ROUNDS) -> float:
    """Held-out accuracy after `rounds` rounds; device 0 poisons its update if attack is set."""
    torch.set_num_threads(1)
    fed = federated_digits(10, alpha=100.0, seed=0)
    spec = ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10})
    model = build_model(spec, seed=0)
    vector = flatten_state_dict(model.state_dict())
    strategy = make_strategy(strategy_name)
    config = LocalTrainingConfig(local_epochs=2)
    for r in range(rounds):
        results = [
            train_local(model, vector, data, config, seed=100 * r + i)
            for i, data in enumerate(fed.clients)
        ]
        stack = np.stack([res.delta for res in results])
        if attack is not None:
            stack[0] *= np.float32(ATTACKS[attack])
        if isinstance(strategy, RobustStrategy):
            delta = strategy.combine(stack)
        else:
            weights = np.array([res.num_examples for res in results], dtype=np.float64)
            delta = (weights @ stack / weights.sum()).astype(np.float32)
        vector = strategy.aggregate_fit(vector, delta)
    load_flat_into_module(model, vector)
    return evaluate(model, fed.test)[1]


@pytest.fixture(scope="module")
def clean() -> float:
    accuracy = federate("fedavg", None)
    assert accuracy > 0.9, accuracy
    return accuracy


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_one_poisoned_device_collapses_fedavg(clean: float, attack: str) -> None:
    accuracy = federate("fedavg", attack)
    assert accuracy < 0.5, f"fedavg under a {attack} update: {accuracy:.4f} (clean {clean:.4f})"


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("strategy", ["median", "trimmed-mean"])
def test_median_and_trimmed_mean_stay_within_two_points(
    clean: float, strategy: str, attack: str
) -> None:
    accuracy = federate(strategy, attack)
    assert accuracy >= clean - 0.02, (
        f"{strategy} under a {attack} update: {accuracy:.4f}, clean fedavg {clean:.4f}"
    )
