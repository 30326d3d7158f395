"""Local training on a device: the FedProx proximal term on real digits data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.training import LocalTrainingConfig, train_local
from common.data import federated_digits
from common.models import ModelSpec, build_model
from common.tensors import flatten_state_dict

SPEC = ModelSpec("mlp", {"hidden": [32]})


@pytest.fixture(scope="module")
def shard():
    return federated_digits(4, alpha=0.5, seed=0).clients[0]


def _start() -> tuple[nn.Module, np.ndarray]:
    model = build_model(SPEC, seed=0)
    return model, flatten_state_dict(model.state_dict())


def test_fedprox_large_mu_shrinks_the_local_update(shard) -> None:
    """The proximal term mu/2 ||w - w_global||^2 pulls local training back to the global model."""
    norms = {}
    for mu in (0.0, 1.0, 10.0):
        model, start = _start()
        result = train_local(
            model, start, shard, LocalTrainingConfig(local_epochs=3, proximal_mu=mu), seed=1
        )
        norms[mu] = float(np.linalg.norm(result.delta))
    assert norms[0.0] > norms[1.0] > norms[10.0]
    assert norms[10.0] < 0.5 * norms[0.0]


def test_fedprox_step_matches_the_gradient_of_the_proximal_objective(shard) -> None:
    """Two full-batch SGD steps against a hand-written reference of Li et al. (2020), eq. 2."""
    mu, lr = 5.0, 0.5
    config = LocalTrainingConfig(
        local_epochs=2, batch_size=len(shard), learning_rate=lr, momentum=0.0, proximal_mu=mu
    )
    model, start = _start()
    got = train_local(model, start, shard, config, seed=3).delta

    reference, _ = _start()
    anchor = [p.detach().clone() for p in reference.parameters()]
    x, y = torch.from_numpy(shard.x), torch.from_numpy(shard.y)
    for _ in range(2):
        params = list(reference.parameters())
        loss = nn.functional.cross_entropy(reference(x), y)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        grads = torch.autograd.grad(loss + mu / 2 * prox, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    expected = flatten_state_dict(reference.state_dict()) - start
    assert float(np.linalg.norm(expected)) > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_local_adam_fits_the_intent_model_where_sgd_cannot() -> None:
    """The intent model (zero head, tiny mean-pooled features) needs Adam locally (README)."""
    from client.datasource import SimulatedShard
    from common.models import FastText
    from common.tasks import TaskName, TextShard

    loaded = SimulatedShard(TaskName.INTENTS, 0, 100, alpha=0.5, seed=0).load()
    assert isinstance(loaded.train, TextShard)
    model = FastText()
    data = loaded.train.featurized(model.features)
    start = flatten_state_dict(model.state_dict())
    acc = {}
    for optimizer, lr in (("sgd", 5.0), ("adam", 0.1)):
        config = LocalTrainingConfig(local_epochs=5, learning_rate=lr, optimizer=optimizer)
        acc[optimizer] = train_local(model, start, data, config, seed=0).metrics["train_accuracy"]
    assert acc["adam"] > 0.9 > 0.2 > acc["sgd"]


def test_unknown_local_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown local optimizer 'rmsprop'"):
        LocalTrainingConfig(optimizer="rmsprop")


def test_server_sends_the_local_optimizer_to_devices() -> None:
    from server.modelconf import ModelSettings

    assert "local_optimizer" not in ModelSettings().fit_instructions().extra
    fit = ModelSettings(local_optimizer="adam").fit_instructions()
    assert fit.extra["local_optimizer"] == "adam"
    with pytest.raises(ValueError, match="unknown local_optimizer"):
        ModelSettings(local_optimizer="rmsprop").validate()
