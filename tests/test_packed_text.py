"""The one-pass DP-SGD gradient of the fastText model against per-example autograd and Opacus.

`PackedFastText.clipped_gradient_sum` computes each example's gradient norm
from its bag (repeat counts) instead of materializing the embedding's
per-example gradient; these tests hold it to one autograd backward per
example (with repeated buckets and empty texts) and to Opacus's own `hooks`
DP-SGD end to end.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from client.packed_text import PackedFastText
from client.training import DpSgdSettings, LocalTrainingConfig, pack_for_dp, train_local_dp
from common.data import Dataset
from common.models import FastText
from common.tensors import flatten_state_dict
from common.text import PAD


def _model(buckets: int, dim: int, classes: int, seed: int, scale: float = 1.0) -> FastText:
    torch.manual_seed(seed)
    model = FastText(buckets, dim, classes)
    with torch.no_grad():  # away from the zero head of the initialization, so every part matters
        model.embedding.weight.normal_(0.0, scale)
        model.head.weight.normal_(0.0, scale)
        model.head.bias.normal_(0.0, scale)
    return model


def _per_example_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """One backward per example, whole-gradient clip with Opacus's formula, sum."""
    total = torch.zeros(sum(p.numel() for p in model.parameters()))
    for i in range(len(y)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        loss.backward()  # type: ignore[no-untyped-call]
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
        total += grad * min(1.0, max_norm / (float(grad.norm()) + 1e-6))
    return total


@st.composite
def _batches(draw: st.DrawFn) -> tuple[int, torch.Tensor]:
    buckets = draw(st.integers(1, 30))  # few buckets: repeats within a bag are common
    batch = draw(st.integers(1, 8))
    width = draw(st.integers(1, 12))
    rows = []
    for _ in range(batch):
        n = draw(st.integers(0, width))  # 0: an empty text
        ids = draw(st.lists(st.integers(0, buckets - 1), min_size=n, max_size=n))
        rows.append(ids + [PAD] * (width - n))
    return buckets, torch.tensor(rows, dtype=torch.long)


@settings(max_examples=60, deadline=None)
@given(
    batch=_batches(),
    dim=st.integers(1, 6),
    classes=st.integers(2, 5),
    max_norm=st.floats(0.01, 20.0),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_clipped_sum_matches_one_backward_per_example(
    batch: tuple[int, torch.Tensor],
    dim: int,
    classes: int,
    max_norm: float,
    scale: float,
    seed: int,
) -> None:
    buckets, x = batch
    model = _model(buckets, dim, classes, seed, scale)
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    got = PackedFastText(model).clipped_gradient_sum(x, y, max_norm)
    want = _per_example_reference(model, x, y, max_norm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(got.norm()) <= x.shape[0] * max_norm * (1 + 1e-4)


def test_bag_norm_counts_repeats() -> None:
    packed = PackedFastText(FastText(10, 2, 2))
    x = torch.tensor([[4, 4, 4, PAD], [1, 2, 3, 4], [5, 5, 6, PAD], [PAD] * 4])
    # sqrt(sum of squared counts) / n: 3/3, 2/4, sqrt(5)/3, empty -> 0
    torch.testing.assert_close(packed.bag_norms(x), torch.tensor([1.0, 0.5, 5**0.5 / 3, 0.0]))


def test_empty_poisson_batch_contributes_nothing() -> None:
    packed = PackedFastText(FastText(10, 3, 2))
    got = packed.clipped_gradient_sum(
        torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1.0
    )
    assert got.shape == packed.flat.shape and not got.any()


def test_flat_weights_are_the_wire_vector_and_forward_matches() -> None:
    model = _model(40, 5, 3, seed=0)
    packed = PackedFastText(model)
    np.testing.assert_array_equal(
        flatten_state_dict(packed.state_dict()), flatten_state_dict(model.state_dict())
    )
    x = torch.tensor([[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]])
    torch.testing.assert_close(packed(x), model(x))


class _Unpacked(nn.Module):
    """The same network, not a FastText: train_local_dp takes Opacus's hooks path for it."""

    def __init__(self, model: FastText) -> None:
        super().__init__()
        self.embedding = copy.deepcopy(model.embedding)
        self.head = copy.deepcopy(model.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(*FastText.bags(x)))  # type: ignore[no-any-return]


def test_only_plain_fasttext_models_are_packed() -> None:
    model = FastText(10, 2, 2)
    assert isinstance(pack_for_dp(model), PackedFastText)
    assert pack_for_dp(_Unpacked(model)) is None
    frozen = FastText(10, 2, 2)
    frozen.embedding.weight.requires_grad_(False)
    assert not PackedFastText.accepts(frozen)
    summed = FastText(10, 2, 2)
    summed.embedding.mode = "sum"
    assert not PackedFastText.accepts(summed)
    with pytest.raises(TypeError, match="hooks"):
        PackedFastText(_Unpacked(model))


def _distinct_bags(n: int, buckets: int, width: int, classes: int, seed: int) -> Dataset:
    """Texts without repeated buckets (Opacus's EmbeddingBag sampler counts a repeat once)."""
    rng = np.random.default_rng(seed)
    x = np.full((n, width), PAD, dtype=np.int64)
    for i in range(n):
        k = int(rng.integers(1, width + 1))
        x[i, :k] = rng.choice(buckets, size=k, replace=False)
    return Dataset(x, rng.integers(0, classes, n).astype(np.int64))


def test_dp_sgd_matches_opacus_hooks_without_noise() -> None:
    model = _model(64, 8, 5, seed=2, scale=0.5)
    start = flatten_state_dict(model.state_dict())
    data = _distinct_bags(200, 64, 10, 5, seed=0)
    config = LocalTrainingConfig(local_epochs=2, batch_size=16, learning_rate=0.5)
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=0.3)
    packed = train_local_dp(model, start, data, config, dp, seed=7)
    hooks = train_local_dp(_Unpacked(model), start, data, config, dp, seed=7)
    np.testing.assert_allclose(packed.delta, hooks.delta, atol=2e-6)
    assert np.abs(packed.delta).max() > 1e-3  # it trained
    assert (packed.sample_rate, packed.steps) == (hooks.sample_rate, hooks.steps)


def test_dp_sgd_adds_opacus_noise_of_the_promised_scale() -> None:
    """One full-batch step, lr 1, no momentum: noisy - noiseless = noise * sigma C / batch."""
    model = FastText(256, 16, 5)
    start = flatten_state_dict(model.state_dict())
    data = _distinct_bags(100, 256, 6, 5, seed=1)
    config = LocalTrainingConfig(local_epochs=1, batch_size=100, learning_rate=1.0, momentum=0.0)
    clean = train_local_dp(model, start, data, config, DpSgdSettings(0.0, 1.0), seed=3)
    noisy = train_local_dp(model, start, data, config, DpSgdSettings(2.0, 1.0), seed=3)
    noise = noisy.delta - clean.delta
    expected_std = 2.0 * 1.0 / 100
    assert abs(float(noise.mean())) < 5 * expected_std / np.sqrt(noise.size)
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)


def test_devices_draw_their_own_sample_and_noise() -> None:
    model = FastText(64, 4, 3)
    start = flatten_state_dict(model.state_dict())
    data = _distinct_bags(40, 64, 5, 3, seed=2)
    config = LocalTrainingConfig(local_epochs=1, batch_size=8)
    updates = []
    for _ in range(2):
        torch.manual_seed(1234)  # the same global state, as forked devices have
        updates.append(train_local_dp(model, start, data, config, DpSgdSettings(1.0, 1.0)).delta)
    assert not np.allclose(updates[0], updates[1])
