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
from common.rng import GaussianNoise, os_seeded_torch_generator
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
    # "sgd" (with `momentum`) or "adam" (fresh moments each round; `momentum` unused). Adam
    # is for models whose parameters live on very different scales, as the intent model's:
    # its head starts at zero and its features are means of ~100 small embedding rows, so
    # one SGD rate is either too small for the embedding or too large for the head.
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in LOCAL_OPTIMIZERS:
            known = ", ".join(LOCAL_OPTIMIZERS)
            raise ValueError(f"unknown local optimizer {self.optimizer!r}; known: {known}")


LOCAL_OPTIMIZERS = ("sgd", "adam")
LOCAL_OPTIMIZER_KEY = "local_optimizer"
"""FitConfig.extra key naming the devices' local optimizer (absent: sgd)."""


def make_optimizer(params: Any, config: LocalTrainingConfig) -> torch.optim.Optimizer:
    """The local optimizer the config names, over params.

    Torch's fused CPU kernels: the same update as the default per-tensor loop
    (to float32 rounding), in one pass over each parameter instead of one per
    operation. For the 400k-weight intent model, Adam's step went from about
    half of a local training's CPU to a fifth (train_local 158 -> 69 ms for a
    120-query user, 5 epochs; `benchmarks/device_cost.py`).
    """
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, fused=True)
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, fused=True)


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
    # FedProx's anchor (a copy of the global weights) only when it has a term to pull toward.
    anchors = [p.detach().clone() for p in params] if config.proximal_mu > 0 else []
    optimizer = make_optimizer(params, config)
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    n = len(data)
    steps = 0
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            # None, not zeros: backward then stores its gradient instead of adding it to a
            # zeroed buffer, two passes fewer over the fastText embedding (~1/3 of a step).
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            if config.proximal_mu > 0:
                grads = [p.grad for p in params]
                drift = torch._foreach_sub([p.detach() for p in params], anchors)
                torch._foreach_add_(grads, drift, alpha=config.proximal_mu)  # type: ignore[arg-type]
            optimizer.step()
            steps += 1
    optimizer.zero_grad(set_to_none=True)  # a device keeps its model, not its last gradient
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


class _FusedNoise:
    """DP-SGD's noise, clipped sum and scaling for a packed module, in one buffer per step.

    Opacus, per step, deep-copies the gradient into `summed_grad`, allocates
    zeros, then noise, then their sum, then divides by the expected batch:
    passes and allocations over every weight that, for the 400,000-weight
    text model, cost as much as the clipped sum itself. Here the step's noise
    N(0, (sigma C / B)^2) is drawn into one buffer kept across steps
    (`common.rng.GaussianNoise.fill_tensor`: one AES-CTR keystream call and
    Box-Muller in torch's float32 SIMD operations, in place; a cryptographic
    generator at about 0.65 of the CPU of torch's Mersenne Twister `normal_`),
    the packed module adds its clipped sum scaled by 1 / B into
    it, and that is the gradient the optimizer steps with: the same
    (sum + N(0, (sigma C)^2)) / B as Opacus, B its expected batch size.
    Opacus's optimizer keeps the rest (its checks, the accountant's hook, the
    SGD step); its accumulate, add_noise and scale_grad become pass-throughs.
    """

    def __init__(self, optimizer: Any, size: int, seed: int | None) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        if optimizer.loss_reduction != "mean" or optimizer.accumulated_iterations != 1:
            raise RuntimeError("fused DP-SGD noise expects mean reduction and one batch per step")
        self.divisor = float(optimizer.expected_batch_size)
        self.std = optimizer.noise_multiplier * optimizer.max_grad_norm / self.divisor
        self.buffer = torch.empty(size, dtype=torch.float32)
        self.gaussian = GaussianNoise(size, seed)

        def accumulate() -> None:
            for p in optimizer.params:
                p.summed_grad = p.grad

        def add_noise() -> None:  # already in the gradient
            for p in optimizer.params:
                _check_processed_flag(p.summed_grad)
                _mark_as_processed(p.summed_grad)

        optimizer.accumulate = accumulate
        optimizer.add_noise = add_noise
        optimizer.scale_grad = lambda: None

    def draw(self) -> torch.Tensor:
        """The next step's noise (zeros without noise); the clipped sum is added to it."""
        if self.std > 0:
            self.gaussian.fill_tensor(self.buffer, self.std)
        else:
            self.buffer.zero_()
        # Opacus flags a gradient it has noised; this buffer is a new gradient each step.
        self.buffer.__dict__.pop("_processed", None)
        return self.buffer


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
        fused = _FusedNoise(dp_optimizer, packed.flat.numel(), seed)
        scale = 1.0 / fused.divisor
        loop_started, loop_cpu = time.perf_counter(), time.process_time()
        for _ in range(config.local_epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                noisy = packed.add_clipped_gradient_sum(x, y, dp.max_grad_norm, fused.draw(), scale)
                packed.flat.grad = noisy
                dp_optimizer.step()  # the accountant's hook, then SGD
    else:
        private, dp_optimizer, dp_loader = engine.make_private(
            **private_settings, grad_sample_mode="hooks"
        )
        loop_started, loop_cpu = time.perf_counter(), time.process_time()
        for _ in range(config.local_epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad()
                loss = nn.functional.cross_entropy(private(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                dp_optimizer.step()
    epoch_seconds = (time.perf_counter() - loop_started) / max(1, config.local_epochs)
    # The process's CPU time: what a benchmark on a shared machine can compare (wall time
    # counts the other processes' load).
    epoch_cpu_seconds = (time.process_time() - loop_cpu) / max(1, config.local_epochs)
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
            "epoch_cpu_seconds": epoch_cpu_seconds,
            "local_steps": float(steps),
        },
        sample_rate=sample_rate,
        steps=steps,
    )
