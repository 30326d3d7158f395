"""Local training of a downloaded global model on the device's own data.

Returns the update `w_local - w_global` as a flat float32 vector. FedProx
(Li et al., MLSys 2020) adds mu/2 ||w - w_global||^2 to the loss; its
gradient mu (w - w_global) is added to all gradients in one fused
`torch._foreach` call rather than a Python loop over tensors' elements.

`train_local_dp` is the sample-level DP variant: Opacus `PrivacyEngine`
with Poisson sampling (each example joins each batch independently with
rate q = 1 / batches per epoch), per-sample gradient clipping and Gaussian
noise, accounted by the engine's RDP accountant. Batches are gathered with
one tensor index (`__getitems__`) instead of one Python call per example.
Under DP the device reports no metric computed on its data (loss,
accuracy): those would leak outside the accounted mechanism.
"""

from __future__ import annotations

import copy
import importlib
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from client.packed_mlp import PackedMLP
from client.packed_text import PackedFastText
from common.data import Dataset
from common.evaluation import evaluate
from common.rng import os_seeded_torch_generator
from common.tensors import flatten_state_dict, load_flat_into_module

# The first torch.optim constructor imports torch._dynamo (~1 s, sympy and all). Pay that when
# the device starts, not inside its first round's deadline.
importlib.import_module("torch._dynamo")

# Opacus warns that its noise does not come from a CSPRNG (secure_mode needs torchcsprng,
# not packaged for this torch; see the README), and torch that a full backward hook fires
# on inputs that need no gradient (the data): both known, said once in the docs.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass(frozen=True)
class LocalTrainingConfig:
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class TrainResult:
    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float]


def train_local(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    config: LocalTrainingConfig,
    seed: int = 0,
) -> TrainResult:
    """Train model (loaded with global_vector) on data; return the update and metrics."""
    if len(data) == 0:
        raise ValueError("no local training data")
    started = time.perf_counter()
    load_flat_into_module(model, global_vector)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum)
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    n = len(data)
    steps = 0
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            if config.proximal_mu > 0:
                grads = [p.grad for p in params]
                drift = torch._foreach_sub([p.detach() for p in params], anchors)
                torch._foreach_add_(grads, drift, alpha=config.proximal_mu)  # type: ignore[arg-type]
            optimizer.step()
            steps += 1
    train_loss, train_acc = evaluate(model, data)
    delta = flatten_state_dict(model.state_dict()) - global_vector
    if not np.all(np.isfinite(delta)):
        raise FloatingPointError(
            "local training diverged (non-finite update); lower the learning rate"
        )
    return TrainResult(
        delta=delta.astype(np.float32, copy=False),
        num_examples=n,
        metrics={
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "train_seconds": time.perf_counter() - started,
            "local_steps": float(steps),
        },
    )


@dataclass(frozen=True)
class DpSgdSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class DpTrainResult(TrainResult):
    sample_rate: float = 0.0
    steps: int = 0


class _Rows(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Features and labels whose batches are gathered by one index operation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def dp_sample_rate(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch) of Opacus's Poisson loader for a dataset and an expected batch."""
    batches = max(1, -(-num_examples // batch_size))
    return 1.0 / batches, batches


def _streamline_noise(optimizer: Any) -> None:
    """Opacus's accumulate + add_noise for a packed module, without their copies.

    Per step, Opacus deep-copies the gradient into `summed_grad`, then
    allocates zeros, then noise, then their sum: four passes and three
    allocations over the whole parameter, which for an embedding model cost
    as much as the rest of the step. A packed module's gradient is a fresh
    tensor every step (its clipped sum), so it can be `summed_grad` itself,
    and the noise is drawn into one buffer kept across steps and added in
    place. The draw is Opacus's: `normal(0, sigma C)` from the optimizer's
    generator, one call per parameter, same shape.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    noise: dict[int, torch.Tensor] = {}

    def accumulate() -> None:
        for p in optimizer.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for i, p in enumerate(optimizer.params):
            _check_processed_flag(p.summed_grad)
            if std > 0:
                buffer = noise.setdefault(i, torch.empty_like(p.summed_grad))
                buffer.normal_(0.0, std, generator=optimizer.generator)
                p.summed_grad.add_(buffer)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.accumulate = accumulate
    optimizer.add_noise = add_noise


def pack_for_dp(model: nn.Module) -> PackedMLP | PackedFastText | None:
    """The model as a one-pass DP-SGD module when one exists for its architecture."""
    if PackedMLP.layers_of(model) is not None:
        return PackedMLP(model)
    if PackedFastText.accepts(model):
        return PackedFastText(model)
    return None


def train_local_dp(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    config: LocalTrainingConfig,
    dp: DpSgdSettings,
    seed: int | None = None,
) -> DpTrainResult:
    """DP-SGD local training through Opacus; the update plus what the accountant recorded.

    An MLP (Linear layers, element-wise activations) trains as a `PackedMLP`,
    the fastText-style text model as a `PackedFastText`: Opacus's
    ghost-clipping optimizer, Poisson loader and accountant from
    `make_private(grad_sample_mode="ghost")`, with the clipped gradient sum
    computed in one pass instead of through Opacus's two backward passes. Any
    other model trains through Opacus's `hooks` per-sample gradients.

    With `seed=None`, what devices use, the Poisson sample and the noise come
    from a generator seeded with 63 bits of OS entropy for this call. Neither
    may be predictable: amplification by sampling assumes the batch is secret,
    and noise anyone can replay protects nothing. Torch's process-wide
    generator will not do: every device forked from one parent (simulations)
    inherits the same state and would add the same noise. An int seed makes a
    run reproducible, for tests.
    """
    from opacus import PrivacyEngine

    if len(data) == 0:
        raise ValueError("no local training data")
    started = time.perf_counter()
    load_flat_into_module(model, global_vector)
    packed = pack_for_dp(model)
    # Opacus hooks the module it wraps; keep the device's cached model clean.
    work: nn.Module = packed if packed is not None else copy.deepcopy(model)
    work.train()
    optimizer = torch.optim.SGD(
        work.parameters(), lr=config.learning_rate, momentum=config.momentum
    )
    generator = os_seeded_torch_generator() if seed is None else torch.Generator().manual_seed(seed)
    loader = DataLoader(
        _Rows(torch.from_numpy(data.x), torch.from_numpy(data.y).long()),
        batch_size=config.batch_size,
        collate_fn=_batch_as_is,  # type: ignore[arg-type]
        generator=generator,
    )
    engine = PrivacyEngine(accountant="rdp")
    private_settings = {
        "module": work,
        "optimizer": optimizer,
        "data_loader": loader,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "poisson_sampling": True,
        "noise_generator": generator,
    }
    if packed is not None:
        wrapped, dp_optimizer, _, dp_loader = engine.make_private(
            **private_settings, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss()
        )
        wrapped.remove_hooks()  # the norms come from the packed module's single pass instead
        if not dp_optimizer.secure_mode and not hasattr(dp_optimizer, "_adjusted_noise_multiplier"):
            _streamline_noise(dp_optimizer)
        loop_started = time.perf_counter()
        for _ in range(config.local_epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                packed.flat.grad = packed.clipped_gradient_sum(x, y, dp.max_grad_norm)
                dp_optimizer.step()  # Gaussian noise, / expected batch, accountant, SGD
    else:
        private, dp_optimizer, dp_loader = engine.make_private(
            **private_settings, grad_sample_mode="hooks"
        )
        loop_started = time.perf_counter()
        for _ in range(config.local_epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad()
                loss = nn.functional.cross_entropy(private(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                dp_optimizer.step()
    epoch_seconds = (time.perf_counter() - loop_started) / max(1, config.local_epochs)
    history = engine.accountant.history
    steps = sum(int(h[2]) for h in history)
    sample_rate = float(history[-1][1]) if history else 0.0
    # A packed module's state is its one flat Parameter, already in wire order.
    delta = flatten_state_dict(work.state_dict()) - global_vector
    if not np.all(np.isfinite(delta)):
        raise FloatingPointError(
            "local training diverged (non-finite update); lower the learning rate"
        )
    return DpTrainResult(
        delta=delta.astype(np.float32, copy=False),
        num_examples=len(data),
        metrics={
            "train_seconds": time.perf_counter() - started,
            "epoch_seconds": epoch_seconds,
            "local_steps": float(steps),
        },
        sample_rate=sample_rate,
        steps=steps,
    )
