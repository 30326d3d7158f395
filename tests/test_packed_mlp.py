"""The one-pass DP-SGD gradient of PackedMLP against a per-example loop and against Opacus.

`PackedMLP.clipped_gradient_sum` replaces Opacus's per-sample gradients for
MLPs; these tests hold it to the plainest reference (one autograd backward
per example, clip, sum) and to Opacus's own `hooks` DP-SGD end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from client.packed_mlp import PackedMLP
from client.training import DpSgdSettings, LocalTrainingConfig, train_local_dp
from common.data import Dataset, digits_split
from common.models import MLP
from common.tensors import flatten_state_dict

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


def _mlp(input_dim: int, hidden: list[int], classes: int, activation: str, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(input_dim, hidden, classes)
    for i, layer in enumerate(model.net):
        if isinstance(layer, nn.ReLU):
            model.net[i] = ACTIVATIONS[activation]()
    return model


def _per_example_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """One backward per example, whole-gradient clip with Opacus's formula, sum."""
    total = None
    for i in range(len(y)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        loss.backward()  # type: ignore[no-untyped-call]
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
        grad = grad * min(1.0, max_norm / (float(grad.norm()) + 1e-6))
        total = grad if total is None else total + grad
    assert total is not None
    return total


@settings(max_examples=40, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 24), min_size=0, max_size=3),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    batch=st.integers(1, 12),
    max_norm=st.floats(0.01, 20.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_clipped_sum_matches_one_backward_per_example(
    hidden: list[int], activation: str, batch: int, max_norm: float, scale: float, seed: int
) -> None:
    model = _mlp(7, hidden, 5, activation, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 7, generator=gen) * scale
    y = torch.randint(0, 5, (batch,), generator=gen)
    got = PackedMLP(model).clipped_gradient_sum(x, y, max_norm)
    want = _per_example_reference(model, x, y, max_norm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The clip binds: no example contributes more than max_norm.
    assert float(got.norm()) <= batch * max_norm * (1 + 1e-4)


def test_empty_poisson_batch_contributes_nothing() -> None:
    packed = PackedMLP(MLP(4, [3], 2))
    got = packed.clipped_gradient_sum(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 1.0)
    assert got.shape == packed.flat.shape and not got.any()


def test_flat_weights_are_the_wire_vector_and_forward_matches() -> None:
    model = MLP(64, [32, 16], 10)
    packed = PackedMLP(model)
    np.testing.assert_array_equal(
        flatten_state_dict(packed.state_dict()), flatten_state_dict(model.state_dict())
    )
    x = torch.randn(5, 64)
    torch.testing.assert_close(packed(x), model(x))


def test_only_mlps_of_linear_and_elementwise_layers_are_packed() -> None:
    assert PackedMLP.layers_of(MLP(4, [3], 2)) is not None
    with_dropout = MLP(4, [3], 2)
    with_dropout.net[1] = nn.Dropout()  # random per element but not a supported backward
    assert PackedMLP.layers_of(with_dropout) is None
    assert PackedMLP.layers_of(nn.Sequential(nn.Linear(4, 2))) is None
    frozen = MLP(4, [3], 2)
    frozen.net[0].weight.requires_grad_(False)
    assert PackedMLP.layers_of(frozen) is None
    with pytest.raises(TypeError, match="hooks"):
        PackedMLP(nn.Sequential(nn.Linear(4, 2)))


def _as_sequential(model: MLP) -> nn.Sequential:
    """The same network, not an MLP: train_local_dp takes Opacus's hooks path for it."""
    import copy

    return copy.deepcopy(model.net)


def _digits(n: int) -> Dataset:
    train, _ = digits_split(0)
    return Dataset(train.x[:n], train.y[:n])


def test_dp_sgd_matches_opacus_hooks_without_noise() -> None:
    model = MLP(64, [32], 10)
    start = flatten_state_dict(model.state_dict())
    data = _digits(300)
    config = LocalTrainingConfig(local_epochs=2, batch_size=16)
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=0.5)
    packed = train_local_dp(model, start, data, config, dp, seed=7)
    hooks = train_local_dp(_as_sequential(model), start, data, config, dp, seed=7)
    np.testing.assert_allclose(packed.delta, hooks.delta, atol=2e-6)
    assert np.abs(packed.delta).max() > 1e-3  # it trained
    assert (packed.sample_rate, packed.steps) == (hooks.sample_rate, hooks.steps)
    assert packed.steps == 2 * round(1 / packed.sample_rate)


@pytest.mark.parametrize("as_hooks", [False, True], ids=["packed", "hooks"])
def test_devices_forked_from_one_parent_draw_their_own_sample_and_noise(as_hooks: bool) -> None:
    """Same torch global state (what fork gives every simulated device): different updates."""
    model = MLP(64, [32], 10)
    start = flatten_state_dict(model.state_dict())
    data = _digits(60)
    config = LocalTrainingConfig(local_epochs=1, batch_size=8)
    module: nn.Module = _as_sequential(model) if as_hooks else model
    updates = []
    for _ in range(2):
        torch.manual_seed(1234)
        updates.append(train_local_dp(module, start, data, config, DpSgdSettings(1.0, 1.0)).delta)
    assert not np.allclose(updates[0], updates[1])
    # And a fixed seed, for tests, still reproduces a run exactly.
    again = [
        train_local_dp(module, start, data, config, DpSgdSettings(1.0, 1.0), seed=9).delta
        for _ in range(2)
    ]
    np.testing.assert_array_equal(again[0], again[1])


def test_dp_sgd_adds_opacus_noise_of_the_promised_scale() -> None:
    """One full-batch step, lr 1, no momentum: noisy - noiseless = noise * sigma C / batch."""
    model = MLP(64, [32], 10)
    start = flatten_state_dict(model.state_dict())
    data = _digits(200)
    config = LocalTrainingConfig(local_epochs=1, batch_size=200, learning_rate=1.0, momentum=0.0)
    clean = train_local_dp(model, start, data, config, DpSgdSettings(0.0, 1.0), seed=3)
    noisy = train_local_dp(model, start, data, config, DpSgdSettings(2.0, 1.0), seed=3)
    noise = noisy.delta - clean.delta
    expected_std = 2.0 * 1.0 / 200
    assert abs(float(noise.mean())) < 5 * expected_std / np.sqrt(noise.size)
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)
